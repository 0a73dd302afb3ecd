"""Speed of projection and tuning (image·steps/s) with the DigiFace prior, against a bare-torch loop of the same
network and loss. Writes JSON. Usage: python bench/inversion.py [--out PATH] [--quick]"""
import argparse, json, platform, time
from pathlib import Path

import torch
import torch.nn.functional as F

from facecl_nb.generators import load_prior
from facecl_nb.inversion import project, tune, Items, _loss_fn
from facecl_nb.core import atomic_write_json


def bare_project(G, x, steps, lr):
    "Plain Adam on z with the same loss, no checks, no progress, no bookkeeping."
    z = torch.zeros(len(x), 100).normal_(generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr); loss_fn = _loss_fn(None)
    for _ in range(steps):
        loss = loss_fn(G.main(z[:, :, None, None]), x).sum()
        opt.zero_grad(); loss.backward(); opt.step()


def bare_tune(G, x, z, steps, lr):
    import copy
    Gt = copy.deepcopy(G).requires_grad_(True)
    opt = torch.optim.Adam(Gt.parameters(), lr=lr); loss_fn = _loss_fn(None)
    for _ in range(steps):
        loss = loss_fn(Gt.main(z[:, 0, :, None, None]), x).mean()
        opt.zero_grad(); loss.backward(); opt.step()


def timed(f, reps=3):
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='bench/results/inversion.json'); ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    G = load_prior(); steps = 10 if a.quick else 30
    rows = []
    for bs in (8, 32):
        with torch.no_grad(): x = G(torch.randn(bs, 100, generator=torch.Generator().manual_seed(bs)))
        anchors = torch.randn(bs, 1, 100)
        t_proj = timed(lambda: project(G, x, steps=steps, lr=0.1, batch_size=bs, progress=False, init='mean', lpips_weight=None))
        t_proj_bare = timed(lambda: bare_project(G, x, steps, 0.1))
        t_tune = timed(lambda: tune(G, Items(x, anchors), steps=steps, lr=1e-3, batch_size=bs, progress=False, lpips_weight=None))
        t_tune_bare = timed(lambda: bare_tune(G, x, anchors, steps, 1e-3))
        rows.append({'batch': bs, 'steps': steps,
                     'project_img_steps_per_s': bs * steps / t_proj, 'project_bare_img_steps_per_s': bs * steps / t_proj_bare,
                     'project_overhead': t_proj / t_proj_bare,
                     'tune_img_steps_per_s': bs * steps / t_tune, 'tune_bare_img_steps_per_s': bs * steps / t_tune_bare,
                     'tune_overhead': t_tune / t_tune_bare})
        print(json.dumps(rows[-1]))
    out = {'bench': 'inversion', 'generator': 'digiface-dcgan 64px', 'threads': torch.get_num_threads(), 'machine': platform.processor() or platform.machine(),
           'torch': torch.__version__, 'results': rows, 'goal': 'overhead (ours / bare torch) <= 1.2'}
    atomic_write_json(Path(a.out), out); print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
