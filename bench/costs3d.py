"""What one optimization step of each 3D stage costs per photo on one CPU thread, with the demo tier's 3D prior:
the fixed anchors' projection (encoder code refined with LPIPS-AlexNet + L2), the authors' W+ evaluation (LPIPS-VGG
from the mean w), a reconstruction tuning step and an adversarial (GAN) step with the demo discriminator's
architecture. Also the W+ evaluation's quality against its step count on alice's first test photos at their cameras.
These numbers size the demo3d profile and `make figures3d`. Writes JSON.
Also the same W+ evaluation started at the test photo's encoder code (the demo tier's start).
Usage: python bench/costs3d.py [--prior PATH] [--out PATH] [--curve 20,50,100] [--skip-mean]"""
import argparse, json, platform, time
from pathlib import Path

import torch

from facecl_nb.core import FreeConfig, ProjectionConfig
from facecl_nb.eg3d import load_eg3d
from facecl_nb.prior3d import load_prior3d
from facecl_nb.encoders import load_encoder
from facecl_nb.experiments import albums_3d
from facecl_nb.inversion import project, tune, Items
from facecl_nb.projector import WPlusConfig, eg3d_project
from facecl_nb.evaluation import evaluate
from facecl_nb.adversarial import AdversarialConfig, adversarial_tune, demo_discriminator


def per_photo_step(fn, n_photos, steps):
    t = time.perf_counter(); fn(); return (time.perf_counter() - t) / (n_photos * steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--prior', default=None, help='a 3D prior .safetensors (default: the shipped demo prior)')
    ap.add_argument('--out', default='bench/results/costs3d.json'); ap.add_argument('--curve', default='20,50,100')
    ap.add_argument('--skip-mean', action='store_true', help='leave out the W+ curve from the mean w (the slow part)')
    a = ap.parse_args()
    torch.set_num_threads(1)
    G = (load_eg3d(a.prior) if a.prior else load_prior3d()).eval().requires_grad_(False)
    album = albums_3d(persons=['alice'], log=lambda *x: None)[0]
    x, c = album.images(0, 'train')[:8], album.cameras(0, 'train')[:8]
    enc = load_encoder('dcgan-encoder-demo', G=G)
    P = ProjectionConfig(steps=40, lr=0.05, batch_size=20)
    out = {'bench': 'costs3d', 'prior': a.prior or 'eg3d-demo (shipped)', 'threads': 1, 'machine': platform.machine(), 'torch': torch.__version__,
           'seconds_per_photo_step': {}}
    s = out['seconds_per_photo_step']
    s['anchors_project'] = per_photo_step(lambda: project(G, x, steps=5, lr=P.lr, init=enc.latents(G, x, c), c=c, batch_size=8, progress=False), 8, 5)
    s['eval_wplus'] = per_photo_step(lambda: eg3d_project(G, x, c, WPlusConfig(steps=5, lr=0.01), space='w+'), 8, 5)
    items = Items(x, enc.latents(G, x, c), c, [0] * 8, [f"0/{i}" for i in range(8)])
    s['tune_reconstruction'] = per_photo_step(lambda: tune(G, items, None, steps=5, batch_size=2, lr=2e-3, mix='uniform', seed=0, progress=False), 2, 5)
    D = demo_discriminator()
    s['tune_adversarial_b4'] = per_photo_step(lambda: adversarial_tune(G, D, x, c, steps=4, cfg=AdversarialConfig(batch_size=4, r1_gamma=1.0, freeze_d=0)), 4, 4)
    tests = {t: album.images(t, 'test') for t in (0, 1)}; cams = {t: album.cameras(t, 'test') for t in (0, 1)}
    curve = {}
    for steps in ([] if a.skip_mean else [int(v) for v in a.curve.split(',')]):
        t0 = time.perf_counter()
        ev = evaluate(G, tests, 'wplus', cameras=cams, free=FreeConfig(steps=steps, lr=0.01), metrics=('psnr', 'lpips', 'dlib_dist'))
        curve[steps] = {m: sum(v) / len(v) for m, v in ev.rows.items()} | {'seconds': time.perf_counter() - t0}
        print('wplus', steps, curve[steps], flush=True)
    init = {t: enc.latents(G, v, cams[t]) for t, v in tests.items()}
    curve_enc = {}
    for steps in [int(v) for v in a.curve.split(',')]:     # the demo tier's start: the test photo's encoder code (Protocol.wplus_start='encoder')
        t0 = time.perf_counter()
        ev = evaluate(G, tests, 'wplus', init=init, wplus_start='encoder', cameras=cams, free=FreeConfig(steps=steps, lr=0.01), metrics=('psnr', 'lpips', 'dlib_dist'))
        curve_enc[steps] = {m: sum(v) / len(v) for m, v in ev.rows.items()} | {'seconds': time.perf_counter() - t0}
        print('wplus from the encoder code', steps, curve_enc[steps], flush=True)
    out['wplus_from_encoder_curve'] = curve_enc
    ev = evaluate(G, tests, 'free', init=init, cameras=cams, free=FreeConfig(steps=20, lr=0.05), metrics=('psnr', 'lpips', 'dlib_dist'))
    out['wplus_curve'] = curve
    out['free20_from_encoder'] = {m: sum(v) / len(v) for m, v in ev.rows.items()}
    out['n_test_photos'] = sum(len(v) for v in tests.values())
    print(json.dumps(out, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == '__main__':
    main()
