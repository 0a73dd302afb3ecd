"""Replay-buffer selection: ER-Hull (C=5000) and hull-greedy — time and achieved score — against the published
formulation (PCA to k-1 dims, qhull, one scipy SLSQP solve per point) timed on a subset of candidates and
extrapolated per candidate. Writes JSON. Usage: python bench/replay.py [--out PATH] [--quick]"""
import argparse, json, platform, time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.spatial import ConvexHull, QhullError

from facecl_nb.replay import select_buffer, hull_score, hull_candidates, default_spread, _batch_scores
from facecl_nb.core import atomic_write_json


def make_pool(P, D, T=10, seed=0):
    "P items over T timestamps: a drifting mean per timestamp plus spread."
    r = np.random.default_rng(seed)
    ts = np.sort(np.arange(P) % T)
    centres = np.cumsum(r.normal(size=(T, D)) * 0.5, axis=0)
    return centres[ts] + r.normal(size=(P, D)), ts


def reference_score(X, ts, S, spread):
    "The published way: PCA of the pool to k-1 dims, qhull of the buffer, an SLSQP solve for every point outside."
    k = len(S); d = max(k - 1, 1)
    mu = X.mean(0); U, s, Vt = np.linalg.svd(X - mu, full_matrices=False); Y = (X - mu) @ Vt[:d].T
    V = Y[S]
    eq = None
    if k > d:
        try: eq = ConvexHull(V, qhull_options='QJ').equations
        except (QhullError, ValueError): eq = None
    per_t = []
    for t in np.unique(ts):
        idx = [i for i in np.nonzero(ts == t)[0] if i not in S]
        if not idx: per_t.append(np.mean([spread[i] for i in S if ts[i] == t])); continue
        dist = []
        for i in idx:
            p = Y[i]
            if eq is not None and np.all(eq[:, :-1] @ p + eq[:, -1] <= 1e-12): dist.append(0.0); continue
            f = lambda l: np.sum((l @ V - p) ** 2)
            res = minimize(f, np.full(k, 1 / k), jac=lambda l: 2 * V @ (l @ V - p), method='SLSQP', bounds=[(0, 1)] * k,
                           constraints=[{'type': 'eq', 'fun': lambda l: l.sum() - 1}])
            dist.append(np.sqrt(max(res.fun, 0)))
        per_t.append(np.mean(dist))
    return float(np.mean(per_t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='bench/results/replay.json'); ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    pools = [20, 40] if a.quick else [20, 40, 60]
    dims = [100] if a.quick else [100, 18 * 512]
    ks = [3, 5] if a.quick else [3, 5, 10]
    C = 500 if a.quick else 5000
    n_ref = 10 if a.quick else 20
    rows = []
    for D in dims:
        for P in pools:
            X, ts = make_pool(P, D, seed=P + D)
            Xt = torch.tensor(X)
            for k in ks:
                t0 = time.perf_counter(); bh = select_buffer('hull', Xt, ts, k, seed=0, C=C); th = time.perf_counter() - t0
                t0 = time.perf_counter(); bg = select_buffer('hull-greedy', Xt, ts, k); tg = time.perf_counter() - t0
                sh, sg = hull_score(Xt, ts, bh), hull_score(Xt, ts, bg)
                # the same candidates, scored the published way on a subset
                cands = hull_candidates(ts, k, C, np.random.default_rng(0))
                sub = cands[np.random.default_rng(1).choice(len(cands), size=min(n_ref, len(cands)), replace=False)]
                spread = default_spread(Xt.double(), ts).numpy()
                t0 = time.perf_counter(); ref = [reference_score(X, ts, list(s), spread) for s in sub]; tr = (time.perf_counter() - t0) / len(sub)
                t0 = time.perf_counter(); ours = _batch_scores(Xt.double(), ts, torch.from_numpy(sub), torch.tensor(spread)).numpy(); to = (time.perf_counter() - t0) / len(sub)
                row = {'D': D, 'pool': P, 'k': k, 'C': int(len(cands)),
                       'hull_seconds': th, 'hull_score': sh, 'greedy_seconds': tg, 'greedy_score': sg,
                       'greedy_vs_hull_score': sg - sh, 'greedy_speedup': th / tg,
                       'reference_seconds_per_candidate': tr, 'ours_seconds_per_candidate_in_subset': to,
                       'reference_extrapolated_seconds': tr * len(cands), 'speed_ratio_vs_reference': tr * len(cands) / th,
                       'same_choice_on_subset': bool(np.argmin(ref) == np.argmin(ours)),
                       'rank_corr_on_subset': float(np.corrcoef(np.argsort(np.argsort(ref)), np.argsort(np.argsort(ours)))[0, 1]) if len(sub) > 2 else None}
                rows.append(row); print(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}), flush=True)
    out = {'bench': 'replay', 'threads': torch.get_num_threads(), 'machine': platform.processor() or platform.machine(), 'torch': torch.__version__,
           'quick': a.quick, 'results': rows,
           'targets': {'speed_ratio_vs_reference': '>= 100', 'hull C=5000 pool 40 k=5 D=9216 seconds': '<= 2'}}
    atomic_write_json(Path(a.out), out); print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
