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

MICRO = dict(projection={'steps': 4}, tuning={'steps': 4, 'batch_size': 4}, free={'steps': 4}, hull={'steps': 4}, n_synth=2, hull_candidates=10,
             metrics=('psnr', 'ssim', 'dlib_dist'))


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
    nb = X.run_experiment_notebook('continual_3d', {'runs_dir': str(tmp_path / 'runs'), 'figures_dir': str(tmp_path / 'figs'),
                                                    'album_root': str(album3d.root), 'png': False, 'n_faces': 1},
                                   reports=tmp_path / 'reports', log=lambda *a: None)
    assert nb.is_file()
    written = json.loads((tmp_path / 'figs' / 'figures.json').read_text())['written']
    assert Path(written['novel_views']).is_file() and 'main_table_3d' in written


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
