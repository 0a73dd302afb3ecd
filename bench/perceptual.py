"""What the paper's perceptual loss and metrics cost on the demo tier, on one thread as in a grid task. Writes JSON.

Measured, each the median of repeated calls after a warm-up:
  - a tuning step of the DigiFace DCGAN (forward, backward, no optimizer) on 2 + 2 images (the paired batch) under the
    previous loss (L2 + multi-scale L1) and under L2 + LPIPS(alex), the photos' LPIPS features computed in each step
    or once beforehand (what `tune` does);
  - a step of the free reconstruction (gradients to the latents only) on 25 test photos, the same three ways;
  - DISTS and LPIPS as metrics on 25 pairs, DISTS with the reference photos' features computed or read from its cache;
  - whether several models trained side by side could share a step: one transposed convolution of each DCGAN layer for
    10 models at batch 4, called one model at a time against one grouped call (what stacking models, e.g. with
    `torch.func`, turns the layers into), and one model at batch 40 for reference.
Usage: python bench/perceptual.py [--out PATH] [--reps N]"""
import argparse, json, platform, statistics, time
from pathlib import Path

import torch
import torch.nn.functional as F

from facecl_nb.core import atomic_write_json
from facecl_nb.generators import load_prior
from facecl_nb.inversion import _loss_fn
from facecl_nb.metrics import lpips_loss, dists_metric


def ms(f, reps):
    "Median milliseconds of `f()` over `reps` calls after two warm-up calls."
    f(); f()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); f(); out.append(1000 * (time.perf_counter() - t))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='bench/results/perceptual.json'); ap.add_argument('--reps', type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    G = load_prior()
    res = {'bench': 'perceptual', 'threads': 1, 'machine': platform.processor() or platform.machine(), 'torch': torch.__version__}

    def loss_cases(batch, tune):
        z = torch.randn(batch, G.num_ws, G.w_dim, generator=g)
        with torch.no_grad(): x = G.synthesis(torch.randn(batch, G.num_ws, G.w_dim, generator=g)).clamp(-1, 1)
        out = {}
        for name, w, cached in (('previous L2 + multi-scale L1', 0, False), ('L2 + LPIPS(alex), photo features per step', 1.0, False),
                                ('L2 + LPIPS(alex), photo features once', 1.0, True)):
            L = _loss_fn(w); xf = L.target(x) if cached else None
            if tune:
                G.train().requires_grad_(True)
                def step():
                    G.zero_grad(set_to_none=True); L(G.synthesis(z), x, xf).mean().backward()
            else:
                G.eval().requires_grad_(False); zz = z.clone().requires_grad_(True)
                def step():
                    zz.grad = None; L(G.synthesis(zz), x, xf).sum().backward()
            out[name] = ms(step, a.reps)
        G.eval().requires_grad_(False)
        return out
    res['tuning_step_ms_batch_2_plus_2'] = loss_cases(4, True)
    res['free_reconstruction_step_ms_25_photos'] = loss_cases(25, False)

    x, y = (torch.rand(25, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
    dm, lp = dists_metric(), lpips_loss('alex')
    with torch.no_grad():
        res['metrics_ms_25_pairs'] = {'LPIPS(alex)': ms(lambda: lp(x, y), a.reps),
                                      'DISTS, reference features computed': ms(lambda: dm.from_features(dm.features(x), dm.features(y)), a.reps),
                                      'DISTS, reference features cached': ms(lambda: dm(x, y), a.reps)}

    M, grouped = 10, {}
    for ci, co, hw in ((512, 256, 4), (256, 128, 8), (128, 64, 16), (64, 3, 32)):
        ws = [torch.randn(ci, co, 4, 4, generator=g).requires_grad_(True) for _ in range(M)]
        xs = [torch.randn(4, ci, hw, hw, generator=g).requires_grad_(True) for _ in range(M)]
        W = torch.cat([w.detach() for w in ws]).requires_grad_(True); X = torch.cat([v.detach() for v in xs], 1).requires_grad_(True)
        x40 = torch.randn(40, ci, hw, hw, generator=g).requires_grad_(True)
        def one_by_one():
            for w, v in zip(ws, xs): F.conv_transpose2d(v, w, stride=2, padding=1).sum().backward()
        grouped[f'{ci}->{co} at {hw}x{hw}'] = {
            '10 models one at a time, batch 4': ms(one_by_one, 5),
            '10 models in one grouped call, batch 4': ms(lambda: F.conv_transpose2d(X, W, stride=2, padding=1, groups=M).sum().backward(), 5),
            'one model, batch 40': ms(lambda: F.conv_transpose2d(x40, ws[0], stride=2, padding=1).sum().backward(), 5)}
    res['stacked_models_conv_transpose_fwd_bwd_ms'] = grouped
    print(json.dumps(res, indent=1))
    atomic_write_json(Path(a.out), res); print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
