"""Albums end to end: the `facecl album` commands, import with alignment and its report, and a check that the
timestamps of a synthetic album differ in a way a model must learn."""
import json, subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from facecl_nb.data import Album, AlbumError, synth_album, import_photos, detect_landmarks


def run(*args):
    return subprocess.run(['facecl', *map(str, args)], capture_output=True, text=True)


def test_cli_synth_and_validate(tmp_path):
    r = run('album', 'synth', '--album', tmp_path, '--person', 'ann', '--timestamps', 2, '--train', 3, '--test', 1, '--seed', 4)
    assert r.returncode == 0, r.stderr
    a = Album(tmp_path, 'ann').validate()
    assert a.timestamps == [0, 1] and len(a.files(1, 'train')) == 3
    m = a.meta
    assert m['recipe']['seed'] == 4 and len(m['checks']['distances']) == 8 and m['checks']['max_distance'] < 0.6
    assert run('album', 'validate', '--album', tmp_path, '--person', 'ann').returncode == 0
    # again without --force: refused, nothing changed
    before = (tmp_path / 'ann' / 'album.yaml').read_bytes()
    r = run('album', 'synth', '--album', tmp_path, '--person', 'ann', '--timestamps', 2, '--train', 3, '--test', 1)
    assert r.returncode != 0 and 'already exists' in r.stderr and (tmp_path / 'ann' / 'album.yaml').read_bytes() == before
    # break it in two places: validate lists both, on stderr, exit code != 0
    (tmp_path / 'ann' / '0' / 'test' / '000.png').write_bytes(b'not a png')
    (tmp_path / 'ann' / '1' / 'train' / 'cameras.json').write_text('{"000": [1, 2]}')
    r = run('album', 'validate', '--album', tmp_path, '--person', 'ann')
    assert r.returncode != 0 and r.stdout == ''
    assert '0/test/000.png: unreadable' in r.stderr and 'no camera for: 001, 002' in r.stderr and "'000' is not 25 finite floats" in r.stderr


def test_import_aligns_and_reports(tmp_path):
    from facecl_nb.generators import load_prior
    G = load_prior()
    with torch.no_grad(): faces = G(torch.randn(6, 100, generator=torch.Generator().manual_seed(2)))
    u8 = ((faces.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    src = tmp_path / 'photos'; src.mkdir()
    found = []
    for i, f in enumerate(u8):   # a face upscaled and pasted on a larger canvas
        canvas = Image.new('RGB', (480, 400), (90, 110, 130)); canvas.paste(Image.fromarray(f).resize((256, 256), Image.BICUBIC), (100 + 10 * i, 60))
        canvas.save(src / f'p{i}.jpg', quality=95)
        found.append(len(detect_landmarks(canvas)) == 1)
    Image.new('RGB', (300, 300), (40, 40, 40)).save(src / 'empty.png')            # no face
    two = Image.new('RGB', (700, 400), (90, 110, 130))                               # two faces
    ok = [i for i, f in enumerate(found) if f]
    assert len(ok) >= 2, 'dlib should find the upscaled prior faces'
    for j, i in enumerate(ok[:2]): two.paste(Image.fromarray(u8[i]).resize((256, 256), Image.BICUBIC), (40 + 360 * j, 60))
    two.save(src / 'two.png')
    (src / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    rep = import_photos(src, tmp_path / 'alb', 'me', 0, 'train', size=64, log=lambda *a: None)
    skipped = {Path(s['file']).name: s['reason'] for s in rep['skipped']}
    assert skipped['empty.png'] == 'no face found' and skipped['two.png'] == '2 faces found' and 'unreadable' in skipped['broken.jpg']
    assert len(rep['imported']) == sum(found)
    assert json.loads((tmp_path / 'alb' / 'me' / '0' / 'train' / 'import_report.json').read_text()) == rep
    out = sorted((tmp_path / 'alb' / 'me' / '0' / 'train').glob('*.png'))
    assert len(out) == sum(found) and all(Image.open(p).size == (64, 64) for p in out)
    meta = yaml.safe_load((tmp_path / 'alb' / 'me' / 'album.yaml').read_text())
    assert meta['timestamps'] == [0] and len(meta['provenance']['0/train']['files']) == sum(found)


def test_import_bad_input(tmp_path):
    r = run('album', 'import', tmp_path / 'nowhere', '--album', tmp_path, '--person', 'x', '--timestamp', 0, '--split', 'train')
    assert r.returncode != 0 and 'nowhere' in r.stderr and 'not found' in r.stderr


def test_timestamps_differ_in_a_way_a_model_must_learn(tmp_path):
    "A generator tuned briefly on timestamp 0 reconstructs timestamp 0's test photos better than a distant timestamp's."
    from facecl_nb.generators import load_prior
    from facecl_nb.inversion import project, tune, Items, project_to_hull
    from facecl_nb.metrics import psnr
    a = synth_album(tmp_path, 'tim', timestamps=10, n_train=8, n_test=4, seed=1, log=lambda *_: None)
    G = load_prior()
    A = project(G, a.images(0, 'train'), steps=40, lr=0.1, progress=False)
    Gt = tune(G, Items(a.images(0, 'train'), A), steps=60, lr=2e-3, batch_size=8, progress=False)
    near = project_to_hull(Gt, a.images(0, 'test'), A, steps=40, lr=0.1, progress=False).images
    far = project_to_hull(Gt, a.images(9, 'test'), A, steps=40, lr=0.1, progress=False).images
    p_near, p_far = psnr(near, a.images(0, 'test')).mean().item(), psnr(far, a.images(9, 'test')).mean().item()
    assert p_near > p_far + 1.0, (p_near, p_far)
