"""The real `facecl album synth|import|validate` commands, run as subprocesses: results, byte-identical
regeneration, every problem of a broken album on stderr, and clear errors with exit code != 0 for bad input."""
import json, subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from facecl_nb.data import Album


def facecl(*args):
    return subprocess.run(['facecl', *map(str, args)], capture_output=True, text=True, timeout=300)


SMALL = ('--timestamps', 2, '--train', 3, '--test', 1)


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_synth_validate_and_regenerate(tmp_path):
    r = facecl('album', 'synth', '--album', tmp_path / 'a', '--person', 'ann', *SMALL, '--seed', 4)
    assert r.returncode == 0, r.stderr
    assert 'synth: ann: 2 timestamps x (3 train + 1 test) at 64 px' in r.stdout
    a = Album(tmp_path / 'a', 'ann').validate()
    assert a.timestamps == [0, 1] and len(a.files(1, 'train')) == 3 and len(a.files(0, 'test')) == 1
    m = a.meta
    assert m['recipe']['seed'] == 4 and m['source'] == 'synthetic' and len(m['checks']['distances']) == 8
    assert max(m['checks']['distances'].values()) < 0.6 and {'torch', 'dlib', 'pillow', 'numpy'} <= set(m['versions'])
    r = facecl('album', 'validate', '--album', tmp_path / 'a', '--person', 'ann')
    assert r.returncode == 0 and 'ok' in r.stdout and r.stderr == ''
    # the same arguments into another folder: byte-identical files (album.yaml included)
    assert facecl('album', 'synth', '--album', tmp_path / 'b', '--person', 'ann', *SMALL, '--seed', 4).returncode == 0
    assert tree(tmp_path / 'a') == tree(tmp_path / 'b')
    # again without --force: refused, nothing changed; with --force: regenerated, identical again
    before = tree(tmp_path / 'a')
    r = facecl('album', 'synth', '--album', tmp_path / 'a', '--person', 'ann', *SMALL, '--seed', 5)
    assert r.returncode != 0 and 'already exists' in r.stderr and '--force' in r.stderr and tree(tmp_path / 'a') == before
    assert facecl('album', 'synth', '--album', tmp_path / 'a', '--person', 'ann', *SMALL, '--seed', 4, '--force').returncode == 0
    assert tree(tmp_path / 'a') == before


def test_validate_lists_every_problem(tmp_path):
    assert facecl('album', 'synth', '--album', tmp_path, '--person', 'ann', *SMALL).returncode == 0
    d = tmp_path / 'ann'
    (d / '0' / 'test' / '000.png').write_bytes(b'not a png')
    (d / '1' / 'train' / 'cameras.json').write_text('{"000": [1, 2]}')
    Image.new('RGBA', (64, 64)).save(d / '1' / 'train' / '001.png')
    (d / '1' / 'test' / '000.png').rename(d / '1' / 'test' / '000.txt')
    r = facecl('album', 'validate', '--album', tmp_path, '--person', 'ann')
    assert r.returncode == 1 and r.stdout == ''
    err = r.stderr
    assert 'AlbumError' in err and '6 problem(s)' in err, err
    for needle in [f'{d}/0/test/000.png: unreadable or truncated image', f'{d}/1/train/cameras.json: no camera for: 001, 002',
                   "cameras.json: entry '000' is not 25 finite floats", f'{d}/1/train/001.png: mode RGBA, expected RGB',
                   f'{d}/1/test: no images', f'{d}/album.yaml: content_hash']:        # photos changed after the album was made
        assert needle in err, (needle, err)
    (d / 'album.yaml').unlink()
    r = facecl('album', 'validate', '--album', tmp_path, '--person', 'ann')
    assert r.returncode == 1 and 'album.yaml not found' in r.stderr and '0/test/000.png: unreadable' in r.stderr   # still lists the rest


@pytest.mark.parametrize('args, message', [
    (('--train', 0), 'argument --train: must be an integer >= 1, got 0'),
    (('--test', 0), 'argument --test: must be an integer >= 1, got 0'),
    (('--timestamps', 0), 'argument --timestamps: must be an integer >= 1, got 0'),
    (('--size', 8), 'argument --size: must be an integer >= 16, got 8'),
    (('--seed', -1), 'argument --seed: must be an integer in [0, 2147483646], got -1'),
    (('--seed', 2**31), 'got 2147483648 (a larger seed would repeat a smaller one)'),
])
def test_synth_bad_input(tmp_path, args, message):
    "Refused by the argument parser (exit code 2), before any folder."
    r = facecl('album', 'synth', '--album', tmp_path, '--person', 'x', *args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == '', r.stderr
    assert not (tmp_path / 'x').exists()


def test_validate_and_import_bad_input(tmp_path):
    r = facecl('album', 'validate', '--album', tmp_path, '--person', 'nobody')
    assert r.returncode == 1 and f'{tmp_path}/nobody: person folder not found' in r.stderr
    r = facecl('album', 'import', tmp_path / 'nowhere', '--album', tmp_path, '--person', 'x', '--timestamp', 0, '--split', 'train')
    assert r.returncode == 1 and f'{tmp_path}/nowhere: photos folder (or photo) not found' in r.stderr
    r = facecl('album', 'import', tmp_path, '--album', tmp_path, '--person', 'x', '--timestamp', 0, '--split', 'val')
    assert r.returncode != 0 and 'invalid choice' in r.stderr
    r = facecl('album', 'import', tmp_path, '--album', tmp_path, '--person', 'x', '--timestamp', 0, '--split', 'train', '--size', 8)
    assert r.returncode == 2 and 'argument --size: must be an integer >= 16, got 8' in r.stderr


def test_import_cli(tmp_path):
    from facecl_nb.generators import load_prior
    from facecl_nb.data import to_uint8
    from facecl_nb.faces import detect_landmarks
    G = load_prior()
    with torch.no_grad(): x = G(torch.randn(4, 100, generator=torch.Generator().manual_seed(2)))
    src = tmp_path / 'photos'; src.mkdir()
    n = 0
    for i, f in enumerate(to_uint8(x)):
        c = Image.new('RGB', (480, 400), (90, 110, 130)); c.paste(Image.fromarray(f).resize((256, 256), Image.BICUBIC), (110, 70))
        if len(detect_landmarks(c)) == 1: c.save(src / f'p{i}.jpg', quality=95); n += 1
    assert n >= 2
    Image.new('RGB', (300, 300), (40, 40, 40)).save(src / 'empty.png')
    r = facecl('album', 'import', src, '--album', tmp_path / 'alb', '--person', 'me', '--timestamp', 2, '--split', 'train', '--size', 128)
    assert r.returncode == 0, r.stderr
    assert f'{n} of {n + 1} photos aligned' in r.stdout and 'empty.png: no face found' in r.stdout
    out = tmp_path / 'alb' / 'me' / '2' / 'train'
    assert len(list(out.glob('*.png'))) == n and all(Image.open(p).size == (128, 128) for p in out.glob('*.png'))
    rep = json.loads((out / 'import_report.json').read_text())
    assert [Path(s['file']).name for s in rep['skipped']] == ['empty.png'] and len(rep['imported']) == n
    m = yaml.safe_load((tmp_path / 'alb' / 'me' / 'album.yaml').read_text())
    assert m['timestamps'] == [2] and m['size'] == 128 and m['source'] == 'import' and len(m['provenance']) == n
    # no test split yet: validate names the missing folder
    r = facecl('album', 'validate', '--album', tmp_path / 'alb', '--person', 'me')
    assert r.returncode == 1 and f'{tmp_path}/alb/me/2/test: folder missing' in r.stderr
