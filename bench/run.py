"""Where one demo-tier continual run spends its time (the unit of `make figures`), on one thread as in a grid task.
Profiles `continual_run` (alice, ER-Hull k=3, seed 0) and reports the run's own stage timings, the profiled share of
the face descriptor, tuning, Adam, free-latent reconstruction and synthesis scoring, and two micro-benchmarks
(Adam variants on the DCGAN's weights; the face descriptor per chip, dlib itself against its network run by torch). Writes JSON.
Usage: python bench/run.py [--out PATH] [--quick]   (--quick: 3 timestamps instead of 10)"""
import argparse, cProfile, json, platform, pstats, shutil, tempfile, time
from pathlib import Path

import torch

from facecl_nb.synth import default_demo_albums
from facecl_nb.continual import continual_run, RunConfig
from facecl_nb.profiles import get_profile
from facecl_nb.core import atomic_write_json
from facecl_nb.metrics import DlibEncoder


def cum(stats, file_part, func):
    "Cumulative seconds of the functions named `func` in files containing `file_part` (recursive calls counted once)."
    return sum(v[3] for (f, _, fn), v in stats.stats.items() if fn == func and file_part in f)


def tot(stats, func):
    "Own seconds of the built-in or function `func` (any file)."
    return sum(v[2] for (f, _, fn), v in stats.stats.items() if fn == func)


def adam_ms(G, reps=30):
    out = {}
    ps = list(G.parameters())
    for name, kw in (('default (single tensor)', {}), ('foreach', {'foreach': True}), ('fused', {'fused': True})):
        opt = torch.optim.Adam(ps, lr=1e-4, **kw)
        for p in ps: p.grad = torch.randn_like(p)
        for _ in range(3): opt.step()
        t = time.perf_counter()
        for _ in range(reps): opt.step()
        out[name] = 1000 * (time.perf_counter() - t) / reps
    return out


def descriptor_ms(n=32):
    "ms per 150×150 chip of dlib's face descriptor: dlib itself, and the same network run by torch (what the runs use)."
    out = {}
    for backend in ('dlib', 'torch'):
        e = DlibEncoder(backend); chips = e.chips(torch.rand(n, 3, 64, 64) * 2 - 1)
        e.describe(chips[:2])
        t = time.perf_counter(); e.describe(chips)
        out[backend] = 1000 * (time.perf_counter() - t) / n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='bench/results/run.json'); ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    torch.set_num_threads(1)
    album = default_demo_albums()[0]
    T = 3 if a.quick else None
    tmp = Path(tempfile.mkdtemp(prefix='facecl-bench-run-'))
    try:
        pr = cProfile.Profile(); t0 = time.perf_counter(); pr.enable()
        r = continual_run(album, RunConfig(strategy='hull', buffer=3, seed=0, T=T), tmp/'run', progress=False, log=lambda *x: None)
        pr.disable(); wall = time.perf_counter() - t0
    finally: shutil.rmtree(tmp, ignore_errors=True)
    st = pstats.Stats(pr)
    per = r['timings']['per_timestamp']
    stages = {k: sum(p[k] for p in per) for k in ('anchors_s', 'select_s', 'tune_s', 'eval_s')}
    profiled = {'face_descriptor_s': tot(st, 'compute_face_descriptor') + cum(st, 'dlib_resnet.py', 'describe'),
                'tune_s': cum(st, 'inversion.py', 'tune'),
                'adam_step_s': cum(st, 'adam.py', 'adam'),
                'free_latent_reconstruction_s': cum(st, 'inversion.py', 'reconstruct_free'),
                'synthesis_scores_s': cum(st, 'evaluation.py', 'synthesis_scores'),
                'compute_metrics_s': cum(st, 'metrics.py', 'compute_metrics')}
    G = get_profile("demo").load_prior("cpu")
    out = {'bench': 'run', 'what': 'one continual run, alice, hull k=3, seed 0, demo profile', 'T': len(per), 'threads': 1,
           'machine': platform.processor() or platform.machine(), 'torch': torch.__version__,
           'wall_s': wall, 'stages_s': stages, 'profiled_s': profiled,
           'share_of_wall': {k: v / wall for k, v in profiled.items()},
           'adam_step_ms': adam_ms(G), 'face_descriptor_ms_per_chip': descriptor_ms()}
    print(json.dumps(out, indent=1))
    atomic_write_json(Path(a.out), out); print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
