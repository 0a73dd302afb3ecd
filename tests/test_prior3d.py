"""The demo tier's 3D prior (facecl_nb/assets/eg3d_demo.safetensors, issue 16): its numbers on latents it was not
trained on, against the issue's targets, and the pieces that train it (surface supervision, a resumable state read back
with weights_only=True). About a minute on one thread, most of it dlib."""
import numpy as np
import pytest
import torch

from facecl_nb import prior3d as P
from facecl_nb.cameras import label_from_angles
from facecl_nb.eg3d import rays_from_label

# What the shipped file reaches (nbs/07a_prior3d.ipynb measures the same with `evaluate_prior3d`: 16 unseen latents).
REACHED = dict(psnr=26.541, dlib_teacher=0.383, pairwise=0.549, yaw=0.418)
TOL = dict(psnr=0.1, dlib_teacher=0.01, pairwise=0.01, yaw=0.01)       # other CPUs, other BLAS: tiny differences
HIGHER_IS_BETTER = {'psnr', 'pairwise'}
# issue 16's targets that the shipped prior does NOT reach; see the notebook
SHORT_OF_TARGET = {
    'yaw': 'max 0.42 of 0.4 (mean 0.33): the teacher image projected on the head model itself reaches max 0.42 (mean 0.27), see nbs/07a_prior3d.ipynb',
}


def _keeps(metrics, reached, key):
    "A measured value no worse than what the shipped file reached when it was made (within TOL)."
    v = metrics[key]
    if key in HIGHER_IS_BETTER: assert v >= reached[key] - TOL[key], (key, v, reached[key])
    else: assert v <= reached[key] + TOL[key], (key, v, reached[key])


@pytest.fixture(scope='module')
def metrics():
    return P.evaluate_prior3d(P.load_prior3d())


@pytest.mark.parametrize('key', sorted(REACHED))
def test_shipped_prior3d_keeps_what_it_reached(metrics, key):
    """The shipped prior's numbers do not fall below what was measured when it was made (a retrained or altered file that
    does worse fails here)."""
    _keeps(metrics, REACHED, key)


def _meets(key, v, targets=P.TARGETS): return v >= targets[key] if key in HIGHER_IS_BETTER else v <= targets[key]


@pytest.mark.parametrize('key', [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=SHORT_OF_TARGET[k])) if k in SHORT_OF_TARGET
                                 else k for k in sorted(P.TARGETS)])
def test_shipped_prior3d_issue16_targets(metrics, key):
    """Issue 16's targets. Those in SHORT_OF_TARGET are strict xfails carrying the shortfall: one that starts to pass turns
    the suite red until it is moved out of the list."""
    assert _meets(key, metrics[key]), (key, metrics[key], P.TARGETS[key])


def test_yaw_is_near_what_the_head_model_allows(metrics):
    """The missed yaw target, bounded: the renders turn about as well as the teacher's image projected on the same head
    (the ideal of this geometry), and far better than two different people."""
    assert metrics['yaw_ideal'] > P.TARGETS['yaw']                   # the head model alone misses the target (max over 16)
    assert metrics['yaw_mean'] <= metrics['yaw_ideal_mean'] + 0.1
    assert metrics['yaw_mean'] < 0.75 * metrics['teacher_pairwise']


def test_backbone_is_the_teacher_up_to_its_features():
    """The shipped backbone's transposed convolutions are the DCGAN's own (copied, kept fixed while distilling)."""
    from facecl_nb.generators import load_prior
    T, G = load_prior(), P.load_prior3d()
    convs = [m for m in T.main if isinstance(m, torch.nn.ConvTranspose2d)]
    for mine, theirs in zip(G.backbone.convs, convs): assert torch.equal(mine.weight, theirs.weight)
    assert G.backbone.__class__.__name__ == 'ConvTransposeBackbone' and G.num_ws == 1 and G.w_dim == T.z_dim


def test_views_differ_and_faces_differ(metrics):
    v = metrics['views']
    assert not torch.allclose(v[:, 0], v[:, 2], atol=0.05)          # a turned camera shows something else
    assert (v[:, 0] - v[:, 0].mean(0)).abs().mean() > 0.05          # not one face for every latent


def test_frontal_projector_and_occupancy():
    p, hit = P.surface_points(label_from_angles(torch.zeros(1)), 8)
    t = (torch.arange(8) + 0.5) / 8 * 2 - 1
    v, u = torch.meshgrid(t, t, indexing='ij')
    assert torch.allclose(P.frontal_uv(p)[0], torch.stack([u.reshape(-1), v.reshape(-1)], -1), atol=1e-5)
    c = label_from_angles(torch.tensor([0.35]), torch.tensor([0.1]))
    pg, hg = P.surface_points(c, 16); _, d = rays_from_label(c, 16)
    assert not P.inside_head(pg - 0.01 * d)[hg].any() and P.inside_head(pg + 0.01 * d)[hg].all()


def test_training_resumes_from_a_weights_only_state(tmp_path):
    from facecl_nb.generators import load_prior
    T = load_prior()
    h = P.train_prior3d(tmp_path / 'p.safetensors', steps=2, batch_size=2, save_every=1, progress=False, log=lambda s: None, T=T)
    assert len(h['hist']) == 2 and all(np.isfinite(v) for r in h['hist'] for v in r.values())
    st = torch.load(tmp_path / 'p.train.pt', weights_only=True)
    assert st['step'] == 2
    h2 = P.train_prior3d(tmp_path / 'p.safetensors', steps=3, batch_size=2, save_every=1, progress=False, log=lambda s: None, T=T)
    assert [r['step'] for r in h2['hist']] == [0, 1, 2]


# The camera-consistent prior every 3D run starts from (facecl_nb/assets/eg3d_demo_posed.safetensors, issue 22): each
# unseen latent rendered at the camera its landmarks give and turned ±20° from there (`evaluate_prior3d` on a posed prior).
POSED_REACHED = dict(psnr=25.058, dlib_teacher=0.417, pairwise=0.556, yaw=0.398)
POSED_TARGETS = P.POSED_TARGETS
POSED_SHORT = {'dlib_teacher': '0.417 of 0.40 (16-latent 95 % interval 0.390-0.443): fell from 0.47 to 0.42 in the first 3,600 steps, then flat; fine-tunes with a perceptual loss, the teacher layers unfrozen, a stronger super-resolution or a sharper density do not move it (nbs/07a_prior3d.ipynb, "Where the camera-consistent prior stops"; bench/prior3d_ceiling.py)'}


@pytest.fixture(scope='module')
def posed_metrics():
    return P.evaluate_prior3d(P.load_prior3d_posed())


@pytest.mark.parametrize('key', sorted(POSED_REACHED))
def test_posed_prior_keeps_what_it_reached(posed_metrics, key):
    _keeps(posed_metrics, POSED_REACHED, key)


@pytest.mark.parametrize('key', [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=POSED_SHORT[k])) if k in POSED_SHORT
                                 else k for k in sorted(POSED_TARGETS)])
def test_posed_prior_issue22_targets(posed_metrics, key):
    "Issue 22's targets for the camera-consistent prior; a strict xfail carries the one it misses."
    assert _meets(key, posed_metrics[key], POSED_TARGETS), (key, posed_metrics[key], POSED_TARGETS[key])
