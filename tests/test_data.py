"""Albums end to end (facecl_nb.data, faces, synth): importing real-looking photos with FFHQ alignment and its report, the default
demo albums being reused or repaired, and a check that the timestamps of a synthetic album differ in a way a
model must learn."""
import json, math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from facecl_nb.data import Album, AlbumError, content_hash, to_uint8
from facecl_nb.faces import import_photos, detect_landmarks
from facecl_nb.synth import synth_album, default_demo_albums


@pytest.fixture(scope='module')
def faces():
    "Six faces of the prior, upscaled to 256 px, and which of them dlib's HOG detector finds when pasted on a canvas."
    from facecl_nb.generators import load_prior
    G = load_prior()
    with torch.no_grad(): x = G(torch.randn(6, 100, generator=torch.Generator().manual_seed(2)))
    big = [Image.fromarray(a).resize((256, 256), Image.BICUBIC) for a in to_uint8(x)]
    return big


def on_canvas(face, xy=(110, 70), size=(480, 400)):
    c = Image.new('RGB', size, (90, 110, 130)); c.paste(face, xy); return c


def eye_angle(img):
    "Angle (degrees) of the eye line of the one face dlib finds in `img` (upscaled to 256 px first)."
    lms = detect_landmarks(img.resize((256, 256), Image.BICUBIC))
    assert len(lms) == 1, f'{len(lms)} faces in the aligned crop'
    el, er = lms[0][36:42].mean(0), lms[0][42:48].mean(0)
    return math.degrees(math.atan2(er[1] - el[1], er[0] - el[0]))


def test_import_aligns_and_reports(tmp_path, faces):
    src = tmp_path / 'photos'; src.mkdir()
    found = [len(detect_landmarks(on_canvas(f))) == 1 for f in faces]
    ok = [i for i, f in enumerate(found) if f]
    assert len(ok) >= 3, f'dlib should find most upscaled prior faces, found {found}'
    on_canvas(faces[ok[0]]).save(src / 'a.jpg', quality=95)
    on_canvas(faces[ok[1]], (60, 40)).save(src / 'a.png')                         # same stem as a.jpg
    # a phone photo: pixels stored sideways, EXIF orientation 6 says "rotate 90° clockwise to view"
    side = on_canvas(faces[ok[2]]).rotate(90, expand=True)
    exif = Image.Exif(); exif[0x0112] = 6
    side.save(src / 'phone.jpg', quality=95, exif=exif.tobytes())
    Image.new('RGB', (300, 300), (40, 40, 40)).save(src / 'empty.png')              # no face
    two = Image.new('RGB', (700, 400), (90, 110, 130))                               # two faces
    two.paste(faces[ok[0]], (40, 60)); two.paste(faces[ok[1]], (400, 60)); two.save(src / 'two.png')
    (src / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')                         # unreadable
    (src / 'notes.txt').write_text('not a photo')                                    # ignored
    lines = []
    rep = import_photos(src, tmp_path / 'alb', 'me', 0, 'train', size=64, log=lines.append)
    skipped = {Path(s['file']).name: s['reason'] for s in rep['skipped']}
    assert skipped.keys() == {'empty.png', 'two.png', 'broken.jpg'}
    assert skipped['empty.png'] == 'no face found' and skipped['two.png'] == '2 faces found' and skipped['broken.jpg'].startswith('unreadable')
    assert sorted(r['saved'] for r in rep['imported']) == ['a_jpg.png', 'a_png.png', 'phone.png']
    out = tmp_path / 'alb' / 'me' / '0' / 'train'
    assert json.loads((out / 'import_report.json').read_text()) == rep
    assert sorted(p.name for p in out.glob('*.png')) == ['a_jpg.png', 'a_png.png', 'phone.png']
    for p in out.glob('*.png'):
        im = Image.open(p); assert im.size == (64, 64) and im.mode == 'RGB'
        assert abs(eye_angle(im)) < 5, p                                            # upright, eyes level (EXIF applied)
    assert any('3 of 6 photos aligned' in l for l in lines) and sum('skipped' in l for l in lines) == 4   # summary + one line per skip
    # the album: a test split too, then it validates; album.yaml has the provenance of every file
    import_photos(src / 'a.jpg', tmp_path / 'alb', 'me', 0, 'test', size=64, log=lambda *a: None)
    with pytest.raises(AlbumError, match=r'0/test/a.png: byte-identical to the training photo .*a_jpg.png'):   # a training photo as a test photo
        Album(tmp_path / 'alb', 'me').validate()
    (tmp_path / 'alb' / 'me' / '0' / 'test' / 'a.png').unlink()
    other = tmp_path / 'other'; other.mkdir(); on_canvas(faces[ok[0]].transpose(Image.FLIP_LEFT_RIGHT)).save(other / 'a.jpg', quality=95)
    import_photos(other / 'a.jpg', tmp_path / 'alb', 'me', 0, 'test', size=64, log=lambda *a: None)   # another picture (mirrored)
    a = Album(tmp_path / 'alb', 'me').validate()
    assert a.timestamps == [0] and a.images(0, 'train').shape == (3, 3, 64, 64) and a.meta['source'] == 'import'
    prov = a.meta['provenance']
    assert set(prov) == {'0/train/a_jpg.png', '0/train/a_png.png', '0/train/phone.png', '0/test/a.png'}
    from facecl_nb.core import sha256_file
    assert prov['0/train/phone.png']['sha256'] == sha256_file(src / 'phone.jpg') and 'dlib' in prov['0/train/phone.png']['detector']
    assert prov['0/train/phone.png']['source'] == str((src / 'phone.jpg').resolve())


def test_import_nothing_found(tmp_path):
    src = tmp_path / 'photos'; src.mkdir()
    Image.new('RGB', (200, 200), (10, 20, 30)).save(src / 'wall.png')
    with pytest.raises(RuntimeError, match=r'no photo could be aligned \(1 skipped: wall.png: no face found\)'):
        import_photos(src, tmp_path / 'alb', 'me', 1, 'test', size=64, log=lambda *a: None)
    assert not (tmp_path / 'alb' / 'me').exists()          # the reasons are in the error; no person folder without album.yaml


def test_import_bad_input(tmp_path):
    src = tmp_path / 'photos'; src.mkdir()
    with pytest.raises(FileNotFoundError, match='no photos'): import_photos(src, tmp_path, 'x', 0, 'train')
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"): import_photos(src, tmp_path, 'x', 0, 'val')
    with pytest.raises(ValueError, match='timestamp must be an integer >= 0'): import_photos(src, tmp_path, 'x', -1, 'train')
    synth_album(tmp_path, 'syn', timestamps=1, n_train=1, n_test=1, log=lambda *a: None)
    Image.new('RGB', (200, 200)).save(src / 'p.png')
    with pytest.raises(ValueError, match="source 'synthetic'"): import_photos(src, tmp_path, 'syn', 0, 'train', size=64)
    assert list(tmp_path.glob('x')) == []


def test_default_demo_albums_reused_and_repaired(tmp_path):
    kw = dict(persons={'dan': 5}, timestamps=2, n_train=2, n_test=1)
    a, = default_demo_albums(tmp_path, log=lambda *a: None, **kw)
    h, y = a.meta['content_hash'], a.dir / 'album.yaml'
    stamp = y.stat().st_mtime_ns
    b, = default_demo_albums(tmp_path, log=lambda *a: None, **kw)            # intact: reused, nothing rewritten
    assert y.stat().st_mtime_ns == stamp and b.meta['content_hash'] == h
    (a.dir / '1' / 'test' / '000.png').write_bytes(b'broken')                  # damaged: regenerated bit-for-bit
    c, = default_demo_albums(tmp_path, log=lambda *a: None, **kw)
    assert c.meta['content_hash'] == h == content_hash(c.dir) and c.validate()
    d, = default_demo_albums(tmp_path, log=lambda *a: None, **{**kw, 'n_train': 3})   # another recipe: regenerated
    assert len(d.files(0, 'train')) == 3


def test_timestamps_differ_in_a_way_a_model_must_learn(tmp_path):
    """Tune the prior briefly on timestamp 0 and, separately, on timestamp 9 (anchors by projection, then tuning), and
    reconstruct each timestamp's test photos the way the paper evaluates: projected into the convex hull of the tuned
    generator's anchors. On the same test photos, the generator tuned on their timestamp must win clearly (a 2x2
    cross-evaluation whose diagonal wins), and the t=0 generator must reconstruct t=0 better than distant t=9."""
    from facecl_nb.generators import load_prior
    from facecl_nb.inversion import project, tune, Items, project_to_hull
    a = synth_album(tmp_path, 'tim', timestamps=10, n_train=8, n_test=4, seed=1, log=lambda *_: None)
    G = load_prior()
    err = {}
    for tt in (0, 9):
        x = a.images(tt, 'train')
        A = project(G, x, steps=40, lr=0.1, lpips_weight=None, progress=False)
        Gt = tune(G, Items(x, A), steps=60, lr=2e-3, batch_size=8, lpips_weight=None, progress=False)
        for te in (0, 9):
            y = a.images(te, 'test')
            rec = project_to_hull(Gt, y, A, steps=40, lr=0.1, lpips_weight=None, progress=False).images
            err[tt, te] = (rec - y).square().mean().item()
    print({k: round(v, 4) for k, v in err.items()})   # measured (seed 1): (0,0) .021, (0,9) .093, (9,0) .049, (9,9) .040
    assert err[0, 0] < 0.7 * err[9, 0], err            # t=0 photos: the t=0 generator beats the t=9 generator
    assert err[9, 9] < 0.7 * err[0, 9], err            # t=9 photos: the t=9 generator beats the t=0 generator
    assert err[0, 0] < 0.7 * err[0, 9], err            # the t=0 generator: its own timestamp beats a distant one
