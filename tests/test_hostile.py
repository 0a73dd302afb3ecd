"""Fault suite, second round: what a careless or hostile user can do to a run folder, an album or the command line, and
what must happen. A run is tied to its own state (config and input digests in every state file), nothing outside a run
folder is written or deleted through a symbolic link, a lost results.json is rebuilt, numbers are checked before any
folder exists, album files are parsed with bounds and their provenance checked, a Ray address is identified within
seconds, and a run killed at any step boundary resumes bit for bit."""
import hashlib, http.server, json, os, re, shutil, signal, socket, socketserver, subprocess, sys, threading, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecl_nb import continual as C, grid as GR, rundir as RD
from facecl_nb.core import ConfigError, atomic_write_bytes, verify_file, ChecksumError, _VERIFIED, SEED_MAX
from facecl_nb.data import Album, AlbumError, content_hash
from facecl_nb.synth import synth_album

MICRO = dict(tuning={'epochs': 1}, free={'steps': 4}, hull={'steps': 4}, n_synth=2, hull_candidates=10, metrics=('psnr', 'dlib_dist'))
quiet = lambda *a: None
CFG = dict(strategy='random', buffer=2, T=3)


@pytest.fixture(scope='module')
def album(tmp_path_factory):
    root = tmp_path_factory.mktemp('albums')
    synth_album(root, 'hal', timestamps=3, n_train=3, n_test=2, size=64, seed=12, log=quiet)
    return Album(root, 'hal')


def _run(album, out, log=quiet, **kw):
    return C.continual_run(album, C.RunConfig.from_dict(MICRO, **{**CFG, **kw}), out, progress=False, log=log)


@pytest.fixture(scope='module')
def finished(album, tmp_path_factory):
    out = tmp_path_factory.mktemp('ref') / 'run'
    return out, _run(album, out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst); (dst / '.lock').unlink(missing_ok=True); return dst


def _tree_digest(run: Path) -> dict:
    "sha256 of every state file's tensors and side-data but timings (what a resumed run must reproduce bit for bit)."
    out = {}
    for p in sorted((run / 'state').glob('t*.safetensors')):
        tens, meta = RD.read_state(p)
        meta.pop('timings', None)
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for k in sorted(tens): h.update(k.encode()); h.update(tens[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tens[k].numel() else b'')
        out[p.name] = h.hexdigest()
    return out


def _results(run: Path) -> dict:
    r = json.loads((run / 'results.json').read_text())
    r.pop('timings'); r['versions'].pop('code'); return r


# --- a run is tied to its own state ------------------------------------------------------------------------------

def test_state_of_another_run_is_refused_naming_the_difference(album, finished, tmp_path):
    other = tmp_path / 'other'; _run(album, other, buffer=1, T=2)
    run = _copy(finished[0], tmp_path / 'run')
    for p in (run / 'state').glob('t2*'): p.unlink()                     # the run stopped after t1 ...
    shutil.copy(other / 'state' / 't1.safetensors', run / 'state' / 't1.safetensors')   # ... and t1 is another run's
    with pytest.raises(RD.StateError, match=r't1.safetensors: this state belongs to another run — .*buffer: 1 → 2'):
        _run(album, run)


@pytest.mark.parametrize('damage', ['truncated', 'deleted'])
def test_lost_config_is_restored_from_state_only_for_the_same_run(album, finished, tmp_path, damage):
    run = _copy(finished[0], tmp_path / 'run')
    for p in (run / 'state').glob('t2*'): p.unlink()
    cfg = run / 'config.json'
    if damage == 'truncated': cfg.write_text(cfg.read_text()[:40])
    else: cfg.unlink()
    before = cfg.read_bytes() if cfg.exists() else None
    with pytest.raises(ConfigError, match=r'config.json: (missing|unreadable).*another one — buffer: 2 → 3'):
        _run(album, run, buffer=3)                                         # other arguments: refused, nothing rewritten
    assert (cfg.read_bytes() if cfg.exists() else None) == before
    logs = []
    res = _run(album, run, log=logs.append)                                 # the same run: restored, said, and finished identically
    assert any('restored from the run' in m for m in logs), logs
    assert res['complete'] and res['R'] == finished[1]['R']
    assert json.loads(cfg.read_text()) == json.loads((finished[0] / 'config.json').read_text())


def test_deleted_results_json_is_rebuilt_by_run_and_by_grid(album, finished, tmp_path):
    run = _copy(finished[0], tmp_path / 'run'); (run / 'results.json').unlink()
    logs = []
    res = _run(album, run, log=logs.append)
    assert res['complete'] and res['R'] == finished[1]['R'] and any('results.json was missing' in m for m in logs)
    # a grid: the run folder named as the grid names it, results.json deleted; the grid repairs it and tables count it
    grid = tmp_path / 'grid'; d = grid / GR.run_name('random', 2, 0, 'hal')
    d.parent.mkdir(parents=True); _copy(finished[0], d); (d / 'results.json').unlink()
    logs = []
    s = GR.run_grid(album.root, ['hal'], ['random'], [2], [0], grid, T=3, overrides=MICRO, log=logs.append)
    assert s['runs'][str(d.resolve())]['status'] == 'ok' and not s['failed']
    assert any('results.json is missing; the run rebuilds it' in m for m in logs), logs
    assert [r['run_dir'] for r in RD.collect_results(grid)] == [str(d.resolve())]


# --- symbolic links -----------------------------------------------------------------------------------------------

def test_state_folder_linked_to_another_run_is_refused_and_left_alone(album, finished, tmp_path):
    victim = _copy(finished[0], tmp_path / 'victim')
    (victim / 'state' / '.t9.safetensors.x.tmp').write_bytes(b'keep me')
    before = {p.name: p.read_bytes() for p in (victim / 'state').iterdir()}
    run = tmp_path / 'run'; (run).mkdir(); (run / 'state').symlink_to(victim / 'state')
    with pytest.raises(ConfigError, match=r'run/state: a symbolic link inside the run folder'):
        _run(album, run)
    assert {p.name: p.read_bytes() for p in (victim / 'state').iterdir()} == before    # nothing deleted, nothing written


@pytest.mark.parametrize('name, content', [('.lock', 'do not truncate me'), ('results.json', '{}')])
def test_planted_link_in_the_run_folder_touches_nothing(album, tmp_path, name, content):
    "A planted .lock or results.json link to a file outside the run folder is refused by name; the file is left as it was."
    precious = tmp_path / 'precious'; precious.write_text(content)
    run = tmp_path / 'run'; run.mkdir(); (run / name).symlink_to(precious)
    with pytest.raises(ConfigError, match=re.escape(name) + ': a symbolic link'):
        _run(album, run, T=1)
    assert precious.read_text() == content


# --- numbers are checked once, before any folder ------------------------------------------------------------------

@pytest.mark.parametrize('args, message', [
    (['run', '--epochs', '0'], 'argument --epochs: must be an integer >= 1, got 0'),
    (['run', '--seed', str(SEED_MAX + 1)], 'a larger seed would repeat a smaller one'),
    (['run', '--seed', '-1'], 'argument --seed: must be an integer in [0, 2147483646], got -1'),
    (['run', '--buffer', '-2'], 'argument --buffer: must be an integer >= 0, got -2'),
    (['grid', '--jobs', '0'], 'argument --jobs: must be an integer >= 1, got 0'),
    (['grid', '--buffers', '3', '-1'], 'argument --buffers: must be an integer >= 0, got -1'),
    (['grid', '--seeds', '0', '4294967296'], 'a larger seed would repeat a smaller one'),
])
def test_cli_numbers_refused_before_any_folder(album, tmp_path, args, message):
    who = ['--person', 'hal'] if args[0] == 'run' else ['--persons', 'hal']
    r = subprocess.run([sys.executable, '-m', 'facecl_nb.cli', args[0], '--album', str(album.root), *who, '--out', str(tmp_path / 'o'), *args[1:]],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-600:]
    assert not (tmp_path / 'o').exists()


def test_api_numbers_refused_before_any_folder(album, tmp_path):
    for kw, msg in ((dict(seed=2**32), 'seed .*larger seed would repeat'), (dict(seed=-3), 'seed .*in \\[0, 2147483646\\]'),
                    (dict(buffer=True), 'buffer must be an integer'), (dict(n_synth=0), 'n_synth must be an integer >= 1')):
        with pytest.raises(ConfigError, match=msg): C.RunConfig.from_dict(MICRO, **{**CFG, **kw})
    with pytest.raises(ConfigError, match='buffer must be an integer >= 0, got -1'):
        GR.run_grid(album.root, ['hal'], ['random'], [2, -1], [0], tmp_path / 'g', T=1, overrides=MICRO, log=quiet)
    with pytest.raises(ConfigError, match='jobs must be an integer >= 1'):
        GR.run_grid(album.root, ['hal'], ['random'], [2], [0], tmp_path / 'g', T=1, overrides=MICRO, jobs=0, log=quiet)
    assert not (tmp_path / 'g').exists()
    with pytest.raises(ValueError, match='seed'): synth_album(tmp_path / 'a', 'x', seed=2**31, log=quiet)


def test_out_that_is_a_file_is_named(album, tmp_path):
    f = tmp_path / 'out.txt'; f.write_text('x')
    with pytest.raises(ConfigError, match=r'out.txt: exists and is not a folder'): _run(album, f, T=1)
    with pytest.raises(ConfigError, match=r'out.txt: exists and is not a folder'):
        GR.run_grid(album.root, ['hal'], ['random'], [2], [0], f, T=1, overrides=MICRO, log=quiet)


# --- albums: bounded parsing, provenance, leakage -----------------------------------------------------------------

def _album_copy(album, root: Path, person='hal') -> Path:
    shutil.copytree(album.dir, root / person); return root / person


def test_yaml_alias_bomb_is_refused_at_once(album, tmp_path):
    d = _album_copy(album, tmp_path)
    lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]'] + [f'a{i}: &a{i} [' + ', '.join([f'*a{i-1}'] * 10) + ']' for i in range(1, 12)]
    (d / 'album.yaml').write_text('\n'.join(lines) + '\ntimestamps: *a11\n')
    with pytest.raises(AlbumError, match=r'album.yaml: not valid YAML \(an alias \(\*a0\)'): Album(tmp_path, 'hal').validate()
    (d / 'album.yaml').write_text('timestamps: [0, 1, 2]\n' + '# padding\n' * 600_000)
    with pytest.raises(AlbumError, match=r'more than the 4194304 an album.yaml may have'): Album(tmp_path, 'hal').validate()


def test_changed_photo_of_a_synthetic_album_is_reported(album, tmp_path):
    d = _album_copy(album, tmp_path)
    p = d / '1' / 'train' / sorted(x.name for x in (d / '1' / 'train').glob('*.png'))[0]
    a = np.asarray(Image.open(p)).copy(); a[0, 0] ^= 1; Image.fromarray(a).save(p)
    with pytest.raises(AlbumError, match=r'album.yaml: content_hash .* does not match the photos'): Album(tmp_path, 'hal').validate()


def test_leaked_test_photos_are_reported(album, tmp_path):
    d = _album_copy(album, tmp_path)
    tr = sorted((d / '0' / 'train').glob('*.png'))
    te = sorted((d / '2' / 'test').glob('*.png'))
    shutil.copy(tr[0], te[0])                                               # byte-identical
    Image.open(tr[1]).save(te[1].with_suffix('.jpg'), quality=92); te[1].unlink()   # the same picture, re-encoded
    meta = (d / 'album.yaml').read_text(); (d / 'album.yaml').write_text(meta.replace('source: synthetic', 'source: test'))
    with pytest.raises(AlbumError) as e: Album(tmp_path, 'hal').validate()
    msgs = {Path(p).name: m for p, m in e.value.problems}
    assert 'byte-identical to the training photo' in msgs[te[0].name] and str(tr[0]) in msgs[te[0].name]
    assert 'the same picture as the training photo' in msgs[te[1].with_suffix('.jpg').name]
    assert len(e.value.problems) == 2


def test_default_albums_have_no_false_leaks(album):
    album.validate()          # synthetic photos of one identity in different styles are not "the same picture"


def test_interrupted_import_is_detected(tmp_path):
    from facecl_nb.faces import import_photos
    skimage_data = pytest.importorskip('skimage.data')
    photos = tmp_path / 'photos'; photos.mkdir()
    mirrored = tmp_path / 'mirrored'; mirrored.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photos / 'astronaut.png')
    Image.fromarray(skimage_data.astronaut()[:, ::-1]).save(mirrored / 'mirrored.png')      # another picture of her, for the test split
    import_photos(photos, tmp_path / 'alb', 'eve', 0, 'train', size=128, log=quiet)
    import_photos(mirrored, tmp_path / 'alb', 'eve', 0, 'test', size=128, log=quiet)
    Album(tmp_path / 'alb', 'eve').validate()                            # provenance complete
    d = tmp_path / 'alb' / 'eve' / '0' / 'train'
    shutil.copy(d / 'astronaut.png', d / 'late.png')                        # what an import killed before album.yaml leaves
    with pytest.raises(AlbumError, match=r'late.png: no provenance in album.yaml: an interrupted import'): Album(tmp_path / 'alb', 'eve').validate()


# --- Ray addresses ------------------------------------------------------------------------------------------------

def test_address_of_an_http_server_is_refused_within_seconds():
    srv = socketserver.TCPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(GR.GridError, match='not a Ray GCS'): GR.check_address(f'127.0.0.1:{srv.server_address[1]}', timeout=5)
    finally: srv.shutdown(); srv.server_close()


def test_address_of_a_silent_server_is_refused_after_the_timeout():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()
    try:
        with pytest.raises(GR.GridError, match=r'127.0.0.1:\d+: (no answer within 1 s|the connection failed)'): GR.check_address(f'127.0.0.1:{s.getsockname()[1]}', timeout=1)
    finally: s.close()


# --- messages -----------------------------------------------------------------------------------------------------

def test_long_names_stay_legal(tmp_path):
    p = tmp_path / ('p' * 250)
    atomic_write_bytes(p / ('f' * 250 + '.json'), b'{}')
    assert (p / ('f' * 250 + '.json')).read_bytes() == b'{}'
    from facecl_nb.synth import _tmp_tag
    assert len(f".{_tmp_tag('q' * 250)}.tmp-4194304") < 100


def test_same_size_rewrite_with_old_mtime_is_hashed_again(tmp_path):
    p = tmp_path / 'w.bin'; p.write_bytes(b'a' * 64)
    good = hashlib.sha256(b'a' * 64).hexdigest()
    verify_file(p, good)
    st = p.stat()
    with open(p, 'r+b') as f: f.write(b'b')                              # rewritten in place, same size ...
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))                        # ... and its mtime set back
    with pytest.raises(ChecksumError, match='sha256 mismatch'): verify_file(p, good)


def test_papermill_parameters_of_the_wrong_type_fail_first(tmp_path):
    from facecl_nb.experiments import run_experiment_notebook
    with pytest.raises(ConfigError, match=r"continual_2d.ipynb: parameter png = 'yes' is a str; the notebook expects a bool"):
        run_experiment_notebook('continual_2d', {'png': 'yes'}, reports=tmp_path / 'r', log=quiet)
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['runs'\]"):
        run_experiment_notebook('continual_2d', {'runs': 'x'}, reports=tmp_path / 'r', log=quiet)
    assert not (tmp_path / 'r').exists()


# --- resume is bit-identical at every step boundary ---------------------------------------------------------------

_CODE = ("import sys, json; from facecl_nb import continual as C; from facecl_nb.data import Album; "
         "C.continual_run(Album(sys.argv[1], 'hal'), C.RunConfig.from_dict(json.loads(sys.argv[2]), strategy='random', buffer=2, T=3), "
         "sys.argv[3], progress=False, log=lambda *a: None)")
KILL_POINTS = [f't1:{s}' for s in ('anchors_s', 'select_s', 'tune_s', 'eval_s', 'recon', 'state', 'results')] + ['t2:state']


def _proc(album, out, kill=None):
    env = dict(os.environ); env.pop('FACECL_KILL_AT', None)
    if kill: env['FACECL_KILL_AT'] = kill
    return subprocess.run([sys.executable, '-c', _CODE, str(album.root), json.dumps(MICRO), str(out)], capture_output=True, text=True, env=env)


@pytest.fixture(scope='module')
def uninterrupted(album, tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted') / 'run'
    r = _proc(album, out); assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize('point', KILL_POINTS)
def test_kill_at_every_step_boundary_resumes_bit_identical(album, uninterrupted, tmp_path, point):
    "SIGKILL at the end of each step of t = 1 (and after the last state, before its results): the rerun ends bit for bit as the uninterrupted run."
    out = tmp_path / 'run'
    r = _proc(album, out, kill=point)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-1000:])
    r = _proc(album, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _results(out) == _results(uninterrupted)
    assert _tree_digest(out) == _tree_digest(uninterrupted)
