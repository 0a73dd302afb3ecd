"""Fault suite: what a careful user can do to a run folder or its inputs, and what must happen (nothing runs from a state
file, a changed input is refused, damaged state falls back, bad arguments fail before any work, one process per folder,
a killed run resumes to the same results)."""
import json, os, pickle, random, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from facecl_nb import continual as C, grid as GR, rundir as RD, experiments as X
from facecl_nb.profiles import get_profile
from facecl_nb.core import ConfigError
from facecl_nb.data import Album
from facecl_nb.synth import synth_album

MICRO = dict(tuning={'epochs': 1}, free={'steps': 4}, hull={'steps': 4}, n_synth=2, hull_candidates=10, metrics=('psnr', 'dlib_dist'))
quiet = lambda *a: None


@pytest.fixture(scope='module')
def album(tmp_path_factory):
    root = tmp_path_factory.mktemp('albums')
    synth_album(root, 'fay', timestamps=3, n_train=3, n_test=2, size=64, seed=11, log=quiet)
    return Album(root, 'fay')


@pytest.fixture(scope='module')
def finished(album, tmp_path_factory):
    "A finished reference run (T = 3) to compare recovered runs against."
    out = tmp_path_factory.mktemp('ref') / 'run'
    return out, C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='random', buffer=2, T=3), out, progress=False, log=quiet)


def _same(a, b):
    strip = lambda r: {k: v for k, v in r.items() if k not in ('timings',)}
    return strip(a) == strip(b)


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst); (dst / '.lock').unlink(missing_ok=True); return dst


class _Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_planted_pickle_in_state_never_runs(album, finished, tmp_path):
    run = _copy_run(finished[0], tmp_path / 'run')
    marker = tmp_path / 'pwned'
    (run / 'state' / 't1.pt').write_bytes(pickle.dumps({'G': _Evil(marker)}))
    with pytest.raises(C.StateError, match=r't1.pt: an old-format \(pickle\) state file — refused'):
        C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='random', buffer=2, T=3), run, progress=False, log=quiet)
    # the figures' readers do not unpickle either
    C.RunDir(run).recon(0); C.RunDir(run).pools()
    assert not marker.exists()


@pytest.mark.parametrize('damage', ['truncated', 'random bytes', 'empty', 'one byte changed'])
def test_damaged_state_falls_back_and_ends_identical(album, finished, tmp_path, damage):
    run = _copy_run(finished[0], tmp_path / 'run')
    p = run / 'state' / 't2.safetensors'
    b = p.read_bytes()
    p.write_bytes({'truncated': b[:len(b) // 2], 'random bytes': os.urandom(len(b)), 'empty': b'',
                   'one byte changed': b[:-100] + bytes([b[-100] ^ 1]) + b[-99:]}[damage])
    logs = []
    res = C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='random', buffer=2, T=3), run, progress=False, log=logs.append)
    assert any('t2.safetensors' in m and 'resuming from the state before it' in m for m in logs), logs
    assert (run / 'state' / 't2.safetensors.bad').exists()
    assert _same(res, finished[1])


def test_changed_album_is_refused_on_resume(tmp_path):
    synth_album(tmp_path / 'a', 'gus', timestamps=2, n_train=3, n_test=2, seed=3, log=quiet)
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, T=1)
    C.continual_run(Album(tmp_path / 'a', 'gus'), cfg, tmp_path / 'run', progress=False, log=quiet)
    synth_album(tmp_path / 'a', 'gus', timestamps=2, n_train=3, n_test=2, seed=4, force=True, log=quiet)   # another album, same name
    with pytest.raises(ConfigError, match='holds another run — the album'):
        C.continual_run(Album(tmp_path / 'a', 'gus'), cfg, tmp_path / 'run', progress=False, log=quiet)


@pytest.mark.parametrize('bad, match', [(dict(strategy='hul'), "unknown strategy 'hul'"), (dict(T=0), 'T must be an integer >= 1'),
                                        (dict(T=7), 'T = 7 but album'), (dict(buffer=-1), 'buffer must be an integer >= 0'),
                                        (dict(tuning={'epochs': 0}), 'epochs must be > 0')])
def test_bad_arguments_fail_before_any_work(album, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        cfg = C.RunConfig.from_dict({**MICRO, **{k: v for k, v in bad.items() if k == 'tuning'}},
                                    **{'strategy': 'hull', 'buffer': 2, **{k: v for k, v in bad.items() if k != 'tuning'}})
        C.continual_run(album, cfg, tmp_path / 'run', progress=False, log=quiet)
    assert not (tmp_path / 'run').exists()


def test_cli_refuses_bad_arguments_without_output(album, tmp_path):
    for args, msg in ((['--strategy', 'hul'], "unknown strategy 'hul'"), (['--timestamps', '9'], 'T = 9 but album'),
                      (['--timestamps', '0'], 'argument --timestamps: must be an integer >= 1')):
        r = subprocess.run([sys.executable, '-m', 'facecl_nb.cli', 'run', '--album', str(album.root), '--person', 'fay', '--out', str(tmp_path / 'o')] + args,
                           capture_output=True, text=True)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr[-500:])
        assert not (tmp_path / 'o').exists()
    r = subprocess.run([sys.executable, '-m', 'facecl_nb.cli', 'run', '--album', str(album.root), '--person', '../fay', '--out', str(tmp_path / 'o')],
                       capture_output=True, text=True)
    assert r.returncode != 0 and 'plain folder name' in r.stderr and not (tmp_path / 'o').exists()


def test_second_process_on_the_same_folder_is_refused(album, tmp_path):
    with RD.RunLock(tmp_path / 'run'):
        with pytest.raises(RD.RunLocked, match=f'in use by pid {os.getpid()}'):
            C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, T=1), tmp_path / 'run', progress=False, log=quiet)
    C.continual_run(album, C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, T=1), tmp_path / 'run', progress=False, log=quiet)   # free again


def test_real_photo_of_one_person_imports_and_two_people_are_two(tmp_path):
    "scikit-image's astronaut photo (one face) imports and aligns; the photo mirrored beside itself holds two faces."
    skimage_data = pytest.importorskip('skimage.data')
    from PIL import Image
    from facecl_nb.faces import import_photos, detect_faces
    photos = tmp_path / 'photos'; photos.mkdir()
    a = skimage_data.astronaut()
    Image.fromarray(a).save(photos / 'astronaut.png')
    Image.fromarray(np.concatenate([a, a[:, ::-1]], 1)).save(photos / 'two.png')
    rep = import_photos(photos, tmp_path / 'albums', 'eileen', 0, 'train', size=256, log=quiet)
    assert [Path(r['file']).name for r in rep['imported']] == ['astronaut.png']
    assert [(Path(s['file']).name, s['reason']) for s in rep['skipped']] == [('two.png', '2 faces found')]
    aligned = Image.open(tmp_path / 'albums' / 'eileen' / '0' / 'train' / rep['imported'][0]['saved'])
    (lm, score), = detect_faces(aligned)
    le, re_ = lm[36:42].mean(0), lm[42:48].mean(0)
    assert abs(le[1] - re_[1]) < 0.03 * 256                      # eyes level
    assert abs((le[0] + re_[0]) / 2 - 128) < 0.05 * 256           # centred
    assert 0.18 * 256 < re_[0] - le[0] < 0.32 * 256               # FFHQ scale: the eyes about a quarter of the crop apart


def test_corrupt_user_weight_is_named_at_check_install(tmp_path, monkeypatch):
    "Random bytes under a torchvision-style name fail the hash in its name; check-install names the file, expected and actual."
    monkeypatch.setenv('FACECL_HOME', str(tmp_path))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    bad = tmp_path / 'weights' / 'alexnet-owt-7be5be79.pth'
    bad.parent.mkdir(parents=True); bad.write_bytes(os.urandom(4096))
    from facecl_nb.core import _VERIFIED
    from facecl_nb.install import check_install
    from facecl_nb.metrics import MetricUnavailable, lpips_loss, find_backbone
    _VERIFIED.clear()
    rep = check_install(verbose=False)
    assert rep['weights']['alexnet-imagenet'].startswith('BAD') and 'should start with 7be5be79' in rep['weights']['alexnet-imagenet']
    with pytest.raises(MetricUnavailable, match='alexnet-owt-7be5be79.pth'):
        find_backbone('alex')


def test_failed_import_leaves_no_person_folder(tmp_path):
    from PIL import Image
    from facecl_nb.faces import import_photos
    photos = tmp_path / 'photos'; photos.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photos / 'grey.png')
    (photos / 'broken.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(RuntimeError, match=r'no photo could be aligned .*broken.jpg: unreadable.*grey.png: no face found'):
        import_photos(photos, tmp_path / 'albums', 'nobody', 0, 'train', size=64, log=quiet)
    assert not (tmp_path / 'albums' / 'nobody').exists()


def test_bad_generator_metadata_names_the_file(tmp_path):
    from safetensors.torch import save_file
    from facecl_nb.generators import load_generator, GeneratorError
    for bad in ('{"z_dim": ', '[1, 2]', '{"no_such_arg": 3}'):
        p = tmp_path / 'g.safetensors'
        save_file({'x': torch.zeros(1)}, str(p), metadata={'facecl_arch': 'dcgan', 'facecl_kwargs': bad})
        with pytest.raises(GeneratorError, match=r'g.safetensors: its facecl_kwargs metadata do not build'):
            load_generator(p)


def test_kill_9_during_synth_then_rerun_is_identical(tmp_path):
    "A synth killed at a random moment leaves no half album; the re-run writes the same files as an uninterrupted one."
    from facecl_nb.data import content_hash
    args = ['--person', 'kit', '--timestamps', '3', '--train', '3', '--test', '2', '--seed', '5']
    ref = subprocess.run([sys.executable, '-m', 'facecl_nb.cli', 'album', 'synth', '--album', str(tmp_path / 'ref')] + args, capture_output=True, text=True)
    assert ref.returncode == 0 and (tmp_path / 'ref' / 'kit' / 'album.yaml').is_file(), ref.stderr[-1000:]
    rng = random.Random(int(os.environ.get('FACECL_FAULT_SEED', '0')))
    p = subprocess.Popen([sys.executable, '-m', 'facecl_nb.cli', 'album', 'synth', '--album', str(tmp_path / 'a')] + args,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(1.5, 6)); p.send_signal(signal.SIGKILL); p.wait()
    kit = tmp_path / 'a' / 'kit'
    assert not kit.exists() or (kit / 'album.yaml').exists()          # all or nothing
    r = subprocess.run([sys.executable, '-m', 'facecl_nb.cli', 'album', 'synth', '--album', str(tmp_path / 'a'), '--force'] + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1000:]
    assert content_hash(kit) == content_hash(tmp_path / 'ref' / 'kit')
    assert not list((tmp_path / 'a').glob('.kit*.tmp-*'))               # the killed run's work folder is gone
