"""How many adversarial steps per timestamp the demo tier needs: personalization and forgetting against the steps of
EG3D's GAN training per timestamp, on one person (lower bound, no replay, seed 0, the first T timestamps), with the
demo3d profile's anchors and evaluation. Beside the curve: the same run with the reconstruction objective, and the
prior itself (no tuning). One thread, as a grid task runs. Writes JSON; prints one line per point.
Usage: python bench/adversarial_curve.py [--steps 10,25,50,100] [--lr 2e-4] [--T 3] [--person alice] [--prior P] [--d D]
       [--no-reconstruction] [--out PATH]"""
import argparse, json, platform, shutil, tempfile, time
from pathlib import Path

import numpy as np
import torch

from facecl_nb.continual import continual_run, RunConfig
from facecl_nb.experiments import albums_3d

METRICS = ('psnr', 'lpips', 'dlib_dist')


def summary(r: dict, T: int) -> dict:
    "Per metric: the diagonal's mean (how well model t renders timestamp t: personalization), AIP and AF."
    out = {}
    for m in METRICS:
        R = np.array([[np.nan if v is None else v for v in row] for row in r['R'][m]], dtype=float)
        out[m] = {'diag': float(np.mean(np.diag(R))), 'first_after_last': float(R[T - 1, 0]), 'AIP': r['AIP'][m], 'AF': r['AF'][m]}
    return out


def one(album, T, tuning, G0, D0, tmp, name):
    t0 = time.perf_counter()
    cfg = RunConfig(profile='demo3d', strategy='none', buffer=0, seed=0, T=T, tuning=tuning, metrics=METRICS, synth_metrics=(), threads=1)
    r = continual_run(album, cfg, tmp/name, G0=G0, D0=D0, progress=False, log=lambda *a: None)
    s = summary(r, T) | {'seconds': time.perf_counter() - t0, 'tune_s': sum(p['tune_s'] for p in r['timings']['per_timestamp']),
                          'eval_s': sum(p['eval_s'] for p in r['timings']['per_timestamp'])}
    print(name, json.dumps(s), flush=True)
    return s


def prior_baseline(album, T, G0):
    "The untuned prior scored as the runs score their models (the profile's evaluation), per metric the mean over the T timestamps."
    from facecl_nb.evaluation import evaluate
    from facecl_nb.profiles import get_profile
    prof = get_profile('demo3d')
    G = G0 if G0 is not None else prof.load_prior('cpu')
    enc = prof.load_encoder(G, 'cpu', prof.protocol)
    tests = {t: album.images(t, 'test') for t in range(T)}; cams = {t: album.cameras(t, 'test') for t in range(T)}
    init = {t: enc.latents(G, x, cams[t]) for t, x in tests.items()}
    ev = evaluate(G, tests, prof.protocol.eval, init=init, cameras=cams, free=prof.free, metrics=METRICS, wplus_start=prof.protocol.wplus_start)
    s = {m: {'diag': float(np.mean(v))} for m, v in ev.rows.items()}
    print('prior', json.dumps(s), flush=True)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', default='10,25,50,100'); ap.add_argument('--T', type=int, default=3); ap.add_argument('--person', default='alice')
    ap.add_argument('--prior', default=None, help='a 3D prior .safetensors (default: the profile\'s)')
    ap.add_argument('--d', default=None, help='its discriminator .safetensors (default: the profile\'s)')
    ap.add_argument('--lr', type=float, default=None, help="G's Adam rate in adversarial tuning (default: the profile's)")
    ap.add_argument('--no-reconstruction', action='store_true', help='leave out the reconstruction run and the prior baseline')
    ap.add_argument('--out', default='bench/results/adversarial_curve.json')
    a = ap.parse_args()
    torch.set_num_threads(1)
    from facecl_nb.eg3d import load_eg3d
    from facecl_nb.dual_discriminator import load_discriminator
    G0 = load_eg3d(a.prior).eval().requires_grad_(False) if a.prior else None
    D0 = load_discriminator(a.d) if a.d else None
    album = albums_3d(persons=[a.person], log=lambda *x: None)[0]
    tmp = Path(tempfile.mkdtemp(prefix='facecl-bench-advcurve-'))
    out = {'bench': 'adversarial_curve', 'person': a.person, 'T': a.T, 'strategy': 'none (lower bound)', 'threads': 1,
           'prior': a.prior or 'profile', 'discriminator': a.d or 'profile', 'machine': platform.machine(), 'torch': torch.__version__, 'points': {}}
    try:
        if not a.no_reconstruction:
            out['prior'] = prior_baseline(album, a.T, G0)
            out['reconstruction'] = one(album, a.T, {'objective': 'reconstruction'}, G0, D0, tmp, 'reconstruction')
        lr = {} if a.lr is None else {'lr': a.lr}
        out['adversarial_lr'] = a.lr
        for s in [int(v) for v in a.steps.split(',')]:
            out['points'][s] = one(album, a.T, {'objective': 'adversarial', 'steps': s, **lr}, G0, D0, tmp, f'adversarial_{s}')
            Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(out, indent=1))
    finally: shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == '__main__': main()
