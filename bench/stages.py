"""Where one full demo-tier continual run spends its time, stage by stage, without a profiler (its overhead distorts the
small Python-heavy parts): alice, ER-Hull k=3, seed 0, all 10 timestamps, one thread as in a grid task. Times the run's own
steps (tuning, evaluation) and, inside evaluation, the free-latent reconstruction, each metric and synthesis. Writes JSON.
Usage: python bench/stages.py [--out PATH] [--T N]"""
import argparse, functools, json, platform, shutil, tempfile, time
from collections import defaultdict
from pathlib import Path

import torch

import facecl_nb.evaluation as E
import facecl_nb.metrics as M
from facecl_nb.continual import continual_run, RunConfig
from facecl_nb.profiles import get_profile
from facecl_nb.synth import default_demo_albums

SPENT = defaultdict(float)

def timed(fn, key):
    "`fn`, adding its wall seconds to SPENT[key]."
    @functools.wraps(fn)
    def g(*a, **k):
        t = time.perf_counter()
        try: return fn(*a, **k)
        finally: SPENT[key] += time.perf_counter() - t
    return g

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='bench/results/stages.json'); ap.add_argument('--T', type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    E.reconstruct_free = timed(E.reconstruct_free, 'free_reconstruction_s')
    E.synthesis_scores = timed(E.synthesis_scores, 'synthesis_s')
    for name in ('psnr', 'ssim', 'identity_similarity', 'dlib_distance'): setattr(M, name, timed(getattr(M, name), f'metric_{name}_s'))
    M.DISTSMetric.forward = timed(M.DISTSMetric.forward, 'metric_dists_s')
    M.LPIPSMetric.forward = timed(M.LPIPSMetric.forward, 'metric_lpips_s')
    album = default_demo_albums()[0]
    tmp = Path(tempfile.mkdtemp(prefix='facecl-bench-stages-'))
    try:
        t0 = time.perf_counter()
        r = continual_run(album, RunConfig(strategy='hull', buffer=3, seed=0, T=a.T), tmp/'run', progress=False, log=lambda *x: None)
        wall = time.perf_counter() - t0
    finally: shutil.rmtree(tmp, ignore_errors=True)
    per = r['timings']['per_timestamp']
    stages = {k: sum(p[k] for p in per) for k in ('anchors_s', 'select_s', 'tune_s', 'eval_s')}
    out = {'bench': 'stages', 'what': 'one continual run, alice, hull k=3, seed 0, demo profile, no profiler', 'T': len(per), 'threads': 1,
           'settings': {'tuning_epochs': (prof := get_profile('demo')).tuning.epochs, 'free_steps': prof.free.steps},
           'machine': platform.processor() or platform.machine(), 'torch': torch.__version__, 'wall_s': wall,
           'stages_s': stages, 'inside_eval_s': dict(SPENT), 'share_of_wall': {k: v / wall for k, v in {**stages, **SPENT}.items()},
           'result': {'AIP psnr': r['AIP']['psnr'], 'AF psnr': r['AF']['psnr'], 'AIP dists': r['AIP'].get('dists')}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))

if __name__ == '__main__': main()
