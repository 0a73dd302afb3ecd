"""The 3D path end to end on small configs: cameras for an album, one continual run of a tri-plane generator, the
errors of a 3D run without cameras or with a 2D prior, the shipped 3D prior, and the 3D experiment notebook."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facecl_nb import continual as C, grid as GR, rundir as RD, experiments as X
from facecl_nb.profiles import get_profile
from facecl_nb.cameras import album_cameras
from facecl_nb.core import ConfigError
from facecl_nb.data import Album
from facecl_nb.synth import synth_album
from facecl_nb.eg3d import TriPlaneGenerator, small_config

# Small steps, and the pieces each test is about pinned: the encoder-started anchors, the free evaluation and the
# reconstruction objective (demo3d's own defaults, fixed anchors with mirrors, W+ and the adversarial objective, are
# tested below and in test_demo3d_profile_defaults_run_end_to_end).
MICRO = dict(protocol={'anchors': 'encoder+optimize', 'eval': 'free', 'mirror': False, 'wplus_start': 'mean'},
             projection={'steps': 4}, tuning={'steps': 4, 'batch_size': 4, 'objective': 'reconstruction', 'mix': 'paired'},
             free={'steps': 4}, hull={'steps': 4}, n_synth=2, hull_candidates=10, metrics=('psnr', 'ssim', 'dlib_dist'))


@pytest.fixture(scope='module')
def album3d(tmp_path_factory):
    root = tmp_path_factory.mktemp('albums3d')
    synth_album(root, 'kim', timestamps=2, n_train=3, n_test=2, size=64, seed=7)
    a = Album(root, 'kim')
    album_cameras(a, log=lambda *x: None)
    return a


def tiny_g3():
    "The demo3d prior's architecture at a tiny size: the DCGAN's latent space (z = w ∈ R¹⁰⁰), so the demo encoder's codes fit."
    torch.manual_seed(0)
    return TriPlaneGenerator(**small_config(z_dim=100, w_dim=100, backbone='convtranspose', backbone_kwargs=dict(ngf=8, head_channels=16),
                                            plane_resolution=16, rendering_kwargs=dict(depth_resolution=6, depth_resolution_importance=6),
                                            neural_rendering_resolution=16, sr_kwargs=dict(input_resolution=16, block_channels=[16, 16])))


def test_one_continual_run_3d(album3d, tmp_path):
    cfg = C.RunConfig.from_dict(MICRO, strategy='hull', buffer=2, seed=0, person='kim', profile='demo3d', T=2)
    G0 = tiny_g3()
    before = {k: v.clone() for k, v in G0.state_dict().items()}
    res = C.continual_run(album3d, cfg, tmp_path / 'run', G0=G0, progress=False, log=lambda *a: None)
    assert res['complete'] and res['T'] == 2
    R = np.array([[np.nan if v is None else v for v in row] for row in res['R']['psnr']])
    assert np.isnan(R[0, 1]) and np.isfinite(R[[0, 1, 1], [0, 0, 1]]).all()
    assert res['buffers'][1]['buffer_timestamps'] == [0, 0]
    st = C.RunDir(tmp_path / 'run').state(1)
    assert any(not torch.equal(st.weights[k], before[k]) for k in before if not k.startswith('backbone.mapping'))   # tuned
    assert all(torch.equal(G0.state_dict()[k], before[k]) for k in before)                                       # input untouched
    assert len(st.memory.seen.cameras) == 6


def test_3d_run_needs_cameras(tmp_path):
    synth_album(tmp_path, 'lee', timestamps=1, n_train=2, n_test=1, size=64, seed=8)
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, person='lee', profile='demo3d')
    with pytest.raises(ConfigError, match=r'cameras.json: missing.*facecl album cameras'):
        C.continual_run(Album(tmp_path, 'lee'), cfg, tmp_path / 'run', G0=tiny_g3(), progress=False, log=lambda *a: None)
    (tmp_path / 'lee' / '0' / 'train' / 'cameras.json').write_text('{"nope": [1, 2, 3]}')
    with pytest.raises(ConfigError, match=r'train/cameras.json'):
        C.continual_run(Album(tmp_path, 'lee'), cfg, tmp_path / 'run2', G0=tiny_g3(), progress=False, log=lambda *a: None)


def test_3d_run_refuses_a_2d_prior(album3d, tmp_path):
    from facecl_nb.generators import load_prior
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, person='kim', profile='demo3d', T=1)
    with pytest.raises(ConfigError, match='2D generator'):
        C.continual_run(album3d, cfg, tmp_path / 'run', G0=load_prior(), progress=False, log=lambda *a: None)


def test_shipped_prior3d_keeps_identity_across_views():
    """The demo tier's 3D prior: a face rendered at yaw +-20 deg stays within dlib distance 0.6 of its frontal render."""
    from facecl_nb.prior3d import load_prior3d
    from facecl_nb.cameras import label_from_angles
    from facecl_nb.data import to_uint8
    from facecl_nb.faces import dlib_descriptors
    G = load_prior3d()
    z = torch.randn(6, G.z_dim, generator=torch.Generator().manual_seed(123))
    yaws = torch.tensor([-20.0, 0.0, 20.0]).deg2rad()
    with torch.no_grad():
        ws = G.mapping(z, label_from_angles(torch.zeros(6)))
        imgs = torch.stack([G.synthesis(ws, label_from_angles(torch.full((6,), float(y)))) for y in yaws], 1)   # [6, 3 views, ...]
    d = dlib_descriptors(to_uint8(imgs.flatten(0, 1))).reshape(6, 3, -1)
    dist = np.linalg.norm(d[:, [0, 2]] - d[:, [1]], axis=-1)
    assert dist.max() < 0.6, dist
    assert not torch.allclose(imgs[:, 0], imgs[:, 2], atol=0.05)           # the views do differ


def test_papermill_3d_notebook(album3d, tmp_path):
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, person='kim', profile='demo3d', T=2)
    C.continual_run(album3d, cfg, tmp_path / 'runs' / 'kim' / 'none-s0', progress=False, log=lambda *a: None)
    adv = C.RunConfig.from_dict({**MICRO, 'tuning': {**MICRO['tuning'], 'objective': 'adversarial', 'lr': 2e-4, 'steps': 2}},
                                strategy='none', buffer=0, person='kim', profile='demo3d', T=2)      # the comparison run: only the objective differs
    C.continual_run(album3d, adv, tmp_path / 'cmp' / 'kim' / 'none-s0', progress=False, log=lambda *a: None)
    nb = X.run_experiment_notebook('continual_3d', {'runs_dir': str(tmp_path / 'runs'), 'figures_dir': str(tmp_path / 'figs'),
                                                    'album_root': str(album3d.root), 'png': False, 'n_faces': 1,
                                                    'compare_dir': str(tmp_path / 'cmp')},
                                   reports=tmp_path / 'reports', log=lambda *a: None)
    assert nb.is_file()
    written = json.loads((tmp_path / 'figs' / 'figures.json').read_text())['written']
    assert Path(written['novel_views']).is_file() and 'main_table_3d' in written
    rows = Path(written['objective_comparison']).read_text().splitlines()
    assert len(rows) == 3 and [r.split(',')[3] for r in rows[1:]] == ['reconstruction', 'adversarial']   # header, then each run beside its comparison
    hdr, rec, adv = (r.split(',') for r in rows)
    d = float(adv[hdr.index('AIP psnr')]) - float(rec[hdr.index('AIP psnr')])          # the sentence's sign follows the objectives, not the rows' order
    text = '\n'.join(''.join(o.get('data', {}).get('text/markdown', '')) for c in json.loads(nb.read_text())['cells'] for o in c.get('outputs', []))
    assert f"adversarial training gives an AIP PSNR {abs(d):.2f} dB {'higher' if d > 0 else 'lower'}" in text, text[-2000:]
    paired = Path(written['objective_paired']).read_text().splitlines()     # per run type: adversarial − reconstruction over the pairs
    row = dict(zip(paired[0].split(','), next(r.split(',') for r in paired[1:] if ',AIP psnr,' in r)))
    assert row['run'] == 'Lower bound' and row['pairs'] == '1' and abs(float(row['mean']) - d) < 2e-3
    assert row['lo'] in ('', 'nan')                                          # one pair: no interval


def test_demo3d_refuses_a_prior_outside_the_encoders_latent_space(album3d, tmp_path):
    """demo3d's anchors start at the demo encoder's code (z ∈ R¹⁰⁰): a tri-plane prior with another latent space is
    refused by name and shape before any work."""
    from facecl_nb.encoders import EncoderError
    torch.manual_seed(0)
    G0 = TriPlaneGenerator(**small_config(neural_rendering_resolution=16, sr_kwargs=dict(input_resolution=16, block_channels=[16, 16])))
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, seed=0, person='kim', profile='demo3d', T=1)
    with pytest.raises(EncoderError, match=r'dcgan_encoder.*\[1, 100\].*needs \[\d+, 64\]'):
        C.continual_run(album3d, cfg, tmp_path / 'run', G0=G0, progress=False, log=lambda *a: None)
    assert not (tmp_path / 'run' / 'state').exists() or not any((tmp_path / 'run' / 'state').iterdir())


def test_fixed_anchors_mirrors_and_wplus_3d(album3d, tmp_path, monkeypatch):
    """The authors' 3D protocol: anchors projected once into the pretrained prior and kept with the album (a second run,
    of another strategy, projects nothing), each training photo tuned beside its mirror, replay joining the data
    (mix 'uniform'), and the W+ evaluation from the mean w."""
    from facecl_nb.anchors3d import AnchorStore
    from facecl_nb.rundir import read_state
    over = {**MICRO, 'protocol': {'anchors': 'fixed', 'mirror': True, 'eval': 'wplus', 'wplus_start': 'mean'},
            'tuning': {'steps': 4, 'batch_size': 4, 'mix': 'uniform', 'objective': 'reconstruction'}}
    seen, logs = [], []
    real_tune = C.tune
    def spy(G, new, buffer, **kw):
        seen.append((list(new.names), [] if buffer is None else list(buffer.names), kw['mix'])); return real_tune(G, new, buffer, **kw)
    monkeypatch.setattr(C, 'tune', spy)
    G0 = tiny_g3()
    res = {}
    for st, k in (('hull', 2), ('random', 2)):
        cfg = C.RunConfig.from_dict(over, strategy=st, buffer=k, seed=0, person='kim', profile='demo3d', T=2)
        res[st] = C.continual_run(album3d, cfg, tmp_path / st, G0=G0, progress=False, log=logs.append)
    projected = [l for l in logs if l.startswith('anchors ')]
    assert len(projected) == 4, projected                  # 2 timestamps × (photos, mirrors), all in the first run only
    stores = list((album3d.dir / 'anchors').iterdir())
    assert len(stores) == 1 and sorted(p.name for p in stores[0].glob('*.safetensors')) == ['0-mirror.safetensors', '0.safetensors', '1-mirror.safetensors', '1.safetensors']
    A0, _ = read_state(stores[0] / '0.safetensors')
    mem = C.RunDir(tmp_path / 'hull').state(1).memory.seen
    assert torch.equal(mem.anchors[:3], A0['anchors'])          # the run's anchors are the stored ones
    new0, buf0, mix0 = seen[0]
    assert mix0 == 'uniform' and len(new0) == 6 and [n.endswith('~mirror') for n in new0] == [False] * 3 + [True] * 3 and buf0 == []
    new1, buf1, _ = seen[1]
    assert len(buf1) == 4 and sum(n.endswith('~mirror') for n in buf1) == 2      # a replayed photo brings its mirror
    for r in res.values():
        assert r['complete'] and r['protocol']['anchors'] == 'fixed' and r['protocol']['eval'] == 'wplus' and r['protocol']['mirror'] is True
        R = np.array([[np.nan if v is None else v for v in row] for row in r['R']['psnr']])
        assert np.isfinite(R[[0, 1, 1], [0, 0, 1]]).all()


def test_fixed_anchors_of_another_prior_are_not_reused(album3d, tmp_path):
    """Anchors are keyed by the prior's weights: a run with another prior projects its own (the first store is kept)."""
    over = {**MICRO, 'protocol': {'anchors': 'fixed', 'eval': 'free', 'mirror': False}, 'metrics': ('psnr',)}
    cfg = C.RunConfig.from_dict(over, strategy='none', buffer=0, seed=0, person='kim', profile='demo3d', T=1)
    before = set((album3d.dir / 'anchors').glob('*')) if (album3d.dir / 'anchors').exists() else set()
    G1 = tiny_g3()
    with torch.no_grad(): next(G1.parameters()).add_(0.01)
    logs = []
    C.continual_run(album3d, cfg, tmp_path / 'run', G0=G1, progress=False, log=logs.append)
    after = set((album3d.dir / 'anchors').glob('*'))
    assert before < after and any(l.startswith('anchors 0:') for l in logs)


def tiny_d3(res=64):
    from facecl_nb.dual_discriminator import DualDiscriminator
    torch.manual_seed(1)
    return DualDiscriminator(25, res, 3, channel_base=256, channel_max=16, mapping_kwargs=dict(num_layers=2))


ADV = {**MICRO, 'protocol': {'anchors': 'fixed', 'mirror': True, 'eval': 'free'}, 'metrics': ('psnr',),
       'tuning': {'steps': 2, 'batch_size': 2, 'mix': 'uniform', 'objective': 'adversarial', 'r1_gamma': 1.0, 'freeze_d': 10}}


def test_adversarial_objective_carries_d_and_resumes_to_the_same_numbers(album3d, tmp_path):
    """The authors' 3D personalization: EG3D's GAN training per timestamp, resumed from the previous (G, D). D, both
    optimizers' moments and ADA's state go into the run's state file; a run resumed after its first timestamp picks D
    up from there and ends with the same numbers as the run that never stopped."""
    from facecl_nb.rundir import RunState
    cfg = C.RunConfig.from_dict(ADV, strategy='hull', buffer=2, seed=0, person='kim', profile='demo3d', T=2)
    res = C.continual_run(album3d, cfg, tmp_path / 'run', G0=tiny_g3(), D0=tiny_d3(), progress=False, log=lambda *a: None)
    assert res['complete'] and res['protocol']['tuning']['objective'] == 'adversarial'
    rd = C.RunDir(tmp_path / 'run')
    s0, s1 = RunState.load(rd.state_path(0)), RunState.load(rd.state_path(1))
    assert any(k.startswith('D/') for k in s0.extra) and any(k.startswith('opt_D/') for k in s0.extra)
    assert 'ada' in s1.extra_meta and s1.extra_meta['stats']['steps'] == 2
    assert any(not torch.equal(s0.extra[k], s1.extra[k]) for k in s0.extra if k.startswith('D/'))       # D trained on at t = 1
    for p in (rd.state_path(1), tmp_path / 'run' / 'results.json'): p.unlink()
    again = C.continual_run(album3d, cfg, tmp_path / 'run', G0=tiny_g3(), D0=tiny_d3(), progress=False, log=lambda *a: None)
    assert again['R'] == res['R']
    s1b = RunState.load(rd.state_path(1))
    assert all(torch.equal(s1.extra[k], s1b.extra[k]) for k in s1.extra if k.startswith('D/'))


def test_adversarial_objective_refuses_a_discriminator_of_another_resolution(album3d, tmp_path):
    cfg = C.RunConfig.from_dict(ADV, strategy='none', buffer=0, seed=0, person='kim', profile='demo3d', T=1)
    with pytest.raises(ConfigError, match=r'does not fit the prior: img_resolution 32 \(the prior.s: 64\)'):
        C.continual_run(album3d, cfg, tmp_path / 'run', G0=tiny_g3(), D0=tiny_d3(32), progress=False, log=lambda *a: None)
    assert not (tmp_path / 'run').exists()
    with pytest.raises(ConfigError, match="objective must be 'reconstruction' or 'adversarial'"):
        C.RunConfig.from_dict({**ADV, 'tuning': {'objective': 'gan'}}, strategy='none', buffer=0, person='kim', profile='demo3d')


def test_3d_run_refuses_cameras_outside_the_ffhq_pose_range(tmp_path):
    """A camera at 80° of yaw (a profile view, or a bad estimate) is refused before any run folder exists, with the photo and its angle."""
    from facecl_nb.cameras import label_from_angles
    synth_album(tmp_path, 'max', timestamps=1, n_train=2, n_test=1, size=64, seed=9)
    a = Album(tmp_path, 'max')
    album_cameras(a, log=lambda *x: None)
    p = tmp_path / 'max' / '0' / 'train' / 'cameras.json'
    cams = json.loads(p.read_text())
    first = sorted(cams)[0]
    cams[first] = label_from_angles(torch.tensor([np.deg2rad(80.0)]), torch.tensor([0.0]))[0].tolist()
    p.write_text(json.dumps(cams))
    cfg = C.RunConfig.from_dict(MICRO, strategy='none', buffer=0, person='max', profile='demo3d', T=1)
    with pytest.raises(ConfigError, match=rf'photo {first}: yaw \+80° is outside the FFHQ pose range'):
        C.continual_run(Album(tmp_path, 'max'), cfg, tmp_path / 'run', G0=tiny_g3(), progress=False, log=lambda *a: None)
    assert not (tmp_path / 'run').exists()


def test_demo_encoder_codes_reach_a_posed_prior_through_its_mapping(album3d):
    """The camera-consistent demo prior's w is [z, yaw, pitch, roll]: the demo encoder gives z, and `latents` maps it
    with each photo's camera, so the encoder fits the posed prior and its codes start the projection there."""
    from facecl_nb.encoders import load_encoder
    rk = dict(c_gen_conditioning_zero=False, c_scale=1.0)
    torch.manual_seed(0)
    G = TriPlaneGenerator(**small_config(z_dim=100, w_dim=103, backbone='convtranspose-posed', backbone_kwargs=dict(ngf=8), rendering_kwargs=rk))
    E = load_encoder('dcgan-encoder-demo', G=G)
    x, c = album3d.images(0, 'train'), album3d.cameras(0, 'train')
    w = E.latents(G, x, c)
    assert w.shape == (len(x), G.num_ws, 103)
    assert torch.allclose(w[:, 0, :100], E.encode(x)[:, 0]) and torch.allclose(w, G.mapping(E.encode(x)[:, 0], c))
    assert not torch.allclose(w[0, 0, 100:], w[1, 0, 100:]) or torch.allclose(c[0], c[1])      # each photo's own pose


def test_demo3d_profile_defaults_run_end_to_end(album3d, tmp_path):
    """demo3d as shipped, steps cut to two: the camera-consistent prior, fixed anchors with mirrors, reconstruction tuning
    with the buffer joining the data, the W+ evaluation from the encoder's code; and its adversarial option (ADVERSARIAL3D)
    from the shipped demo discriminator, D carried in the run's state."""
    from facecl_nb.rundir import RunState
    from facecl_nb.profiles import ADVERSARIAL3D
    over = dict(projection={'steps': 2}, tuning={'steps': 2}, free={'steps': 2}, metrics=('psnr', 'dlib_dist'), synth_metrics=())
    for name, tuning in (('default', {'steps': 2}), ('adversarial', {'steps': 2, **ADVERSARIAL3D})):
        cfg = C.RunConfig.from_dict({**over, 'tuning': tuning}, strategy='hull', buffer=2, seed=0, person='kim', profile='demo3d', T=2)
        r = C.continual_run(album3d, cfg, tmp_path / name, progress=False, log=lambda *a: None)
        p = r['protocol']
        assert r['complete'] and p['anchors'] == 'fixed' and p['mirror'] is True and p['eval'] == 'wplus' and p['wplus_start'] == 'encoder'
        assert p['tuning']['objective'] == ('reconstruction' if name == 'default' else 'adversarial') and p['tuning']['mix'] == 'uniform'
        R = np.array([[np.nan if v is None else v for v in row] for row in r['R']['psnr']])
        assert np.isfinite(R[[0, 1, 1], [0, 0, 1]]).all() and R[0, 0] > 10          # a face, not noise: the shipped prior renders the photo's code
        s1 = RunState.load(C.RunDir(tmp_path / name).state_path(1))
        assert any(k.startswith('D/') for k in s1.extra) == (name == 'adversarial')
