"""Replay-buffer selection benchmark: ER-Hull (C = 5000) and hull-greedy — selection time and achieved score — and the
same ER-Hull candidates scored the way the published method did it (PCA of the pool to k−1 dims, scipy ConvexHull/qhull,
one scipy SLSQP solve per point outside the hull), timed on a subset of candidates and extrapolated per candidate.
On that subset we also score every candidate with SLSQP in the full latent space (no PCA), to check that our exact solver
picks the same buffer as a general-purpose solver of the same problem.

Pools of 20, 40, 60 items over 10 timestamps (a drifting centre per timestamp plus noise), D = 100 and D = 18×512,
k ∈ {3, 5, 10}. Times are wall-clock on this machine with torch's default threads (median of `--repeats` runs).

Usage: python bench/replay.py [--out bench/results/replay.json] [--quick] [--subset N] [--repeats R]
"""
import argparse, json, os, platform, sys, time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.spatial import ConvexHull, QhullError

from facecl_nb.replay import select_buffer, hull_score, hull_scores, hull_candidates, _Pool, _prep


def make_pool(P: int, D: int, T: int = 10, seed: int = 0):
    "P items over T timestamps: a drifting mean per timestamp plus unit noise."
    r = np.random.default_rng(seed)
    ts = np.sort(np.arange(P) % T)
    centres = np.cumsum(r.normal(size=(T, D)) * 0.5, axis=0)
    return centres[ts] + r.normal(size=(P, D)), ts


def _slsqp_dist(V: np.ndarray, p: np.ndarray) -> float:
    "One SLSQP solve of min ||Vᵀλ − p|| over the simplex (the published per-point solve)."
    k = len(V)
    f = lambda l: float(np.sum((l @ V - p) ** 2))
    jac = lambda l: 2 * (V @ (l @ V - p))
    r = minimize(f, np.full(k, 1 / k), jac=jac, method='SLSQP', bounds=[(0, 1)] * k,
                 constraints=[{'type': 'eq', 'fun': lambda l: l.sum() - 1, 'jac': lambda l: np.ones_like(l)}])
    l = np.clip(r.x, 0, None); l = l / l.sum()
    return float(np.linalg.norm(l @ V - p))


def _aggregate(ts, S, dist: dict, spread) -> float:
    "Score of §2.2 from per-item distances (items outside S) with the own-spread fallback."
    per_t = []
    for t in np.unique(ts):
        out = [i for i in np.nonzero(ts == t)[0] if i not in S]
        per_t.append(np.mean([dist[i] for i in out]) if out else np.mean([spread[i] for i in S if ts[i] == t]))
    return float(np.mean(per_t))


def published_score(Y: np.ndarray, ts, S, spread) -> float:
    "The published way, on latents already reduced by PCA to k−1 dims: qhull of the buffer, SLSQP for every point outside."
    S = [int(i) for i in S]; V = Y[S]
    eq = None
    try: eq = ConvexHull(V).equations                      # k points in k−1 dims: a simplex when they are in general position
    except (QhullError, ValueError): eq = None
    dist = {}
    for i in range(len(Y)):
        if i in S: continue
        if eq is not None and np.all(eq[:, :-1] @ Y[i] + eq[:, -1] <= 1e-12): dist[i] = 0.0
        else: dist[i] = _slsqp_dist(V, Y[i])
    return _aggregate(ts, S, dist, spread)


def slsqp_full_score(X: np.ndarray, ts, S, spread) -> float:
    "The same score with SLSQP in the full latent space (no PCA, no qhull): a general solver of the exact problem."
    S = [int(i) for i in S]; V = X[S]
    return _aggregate(ts, S, {i: _slsqp_dist(V, X[i]) for i in range(len(X)) if i not in S}, spread)


def timed(fn, repeats: int):
    "(result of the last run, median seconds)."
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); ts.append(time.perf_counter() - t0)
    return out, float(np.median(ts))


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_one(P: int, D: int, k: int, C: int, n_sub: int, repeats: int) -> dict:
    X, ts = make_pool(P, D, seed=1000 * P + D + k)
    Xt = torch.tensor(X)
    bh, t_hull = timed(lambda: select_buffer('hull', Xt, ts, k, seed=0, C=C), repeats)
    bg, t_greedy = timed(lambda: select_buffer('hull-greedy', Xt, ts, k), repeats)
    s_hull, s_greedy = hull_score(Xt, ts, bh), hull_score(Xt, ts, bg)
    # the same candidates as select_buffer('hull', seed=0) drew (same generator, same first call)
    cands = hull_candidates(ts, k, C, np.random.default_rng(0))
    pool = _Pool(*_prep(Xt, ts))
    t0 = time.perf_counter(); ours_all = pool.scores(torch.from_numpy(cands)).numpy(); t_score_all = time.perf_counter() - t0
    assert sorted(cands[int(np.argmin(ours_all))].tolist()) == sorted(bh), 'hull selection is not the argmin of its candidates'
    sub = cands[np.random.default_rng(1).choice(len(cands), size=min(n_sub, len(cands)), replace=False)]
    spread = pool.spread.numpy()
    d_pca = max(k - 1, 1)
    t0 = time.perf_counter()
    Xc = X - X.mean(0); _, _, Vt = np.linalg.svd(Xc, full_matrices=False); Y = Xc @ Vt[:d_pca].T
    t_pca = time.perf_counter() - t0
    t0 = time.perf_counter(); ref = np.array([published_score(Y, ts, s, spread) for s in sub]); t_ref = (time.perf_counter() - t0) / len(sub)
    t0 = time.perf_counter(); full = np.array([slsqp_full_score(X, ts, s, spread) for s in sub]); t_full = (time.perf_counter() - t0) / len(sub)
    ours = hull_scores(Xt, ts, sub).numpy()
    ref_total = t_pca + t_ref * len(cands)
    return {'D': D, 'pool': P, 'k': k, 'C': int(len(cands)),
            'hull_seconds': t_hull, 'hull_score': s_hull, 'hull_buffer': sorted(bh),
            'greedy_seconds': t_greedy, 'greedy_score': s_greedy, 'greedy_buffer': sorted(bg),
            'greedy_minus_hull_score': s_greedy - s_hull, 'greedy_not_worse': bool(s_greedy <= s_hull + 1e-9 * abs(s_hull)),
            'greedy_speedup_vs_hull': t_hull / t_greedy,
            'hull_scoring_seconds_all_candidates': t_score_all,
            'subset_size': int(len(sub)),
            'published_seconds_per_candidate': t_ref, 'published_extrapolated_seconds': ref_total,
            'speed_ratio_vs_published': ref_total / t_hull,
            'same_choice_as_published_on_subset': bool(np.argmin(ref) == np.argmin(ours)),
            'rank_corr_with_published_on_subset': spearman(ref, ours) if len(sub) > 2 else None,
            'slsqp_full_seconds_per_candidate': t_full,
            'same_choice_as_slsqp_full_on_subset': bool(np.argmin(full) == np.argmin(ours)),
            'max_rel_diff_vs_slsqp_full': float(np.max(np.abs(full - ours) / np.abs(ours))),
            'min_gap_between_best_two_on_subset': float(np.diff(np.sort(ours)[:2])[0]) if len(sub) > 1 else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='bench/results/replay.json', help='where to write the JSON (default: %(default)s)')
    ap.add_argument('--quick', action='store_true', help='D = 100 only, pools 20 and 40, k 3 and 5, C = 500, subsets of 5')
    ap.add_argument('--subset', type=int, default=None, help='candidates scored the published way per configuration (default 20; quick 5)')
    ap.add_argument('--repeats', type=int, default=None, help='timed runs per selection, median reported (default 3; quick 1)')
    a = ap.parse_args(argv)
    pools = [20, 40] if a.quick else [20, 40, 60]
    dims = [100] if a.quick else [100, 18 * 512]
    ks = [3, 5] if a.quick else [3, 5, 10]
    C = 500 if a.quick else 5000
    n_sub = a.subset or (5 if a.quick else 20)
    repeats = a.repeats or (1 if a.quick else 3)
    rows, t_start = [], time.perf_counter()
    for D in dims:
        for P in pools:
            for k in ks:
                row = run_one(P, D, k, C, n_sub, repeats); rows.append(row)
                print(f"D={D:5d} pool={P:2d} k={k:2d} C={row['C']:4d} | hull {row['hull_seconds']:6.3f} s score {row['hull_score']:9.4f} | "
                      f"greedy {row['greedy_seconds']:6.3f} s score {row['greedy_score']:9.4f} ({row['greedy_speedup_vs_hull']:4.1f}x) | "
                      f"published {row['published_seconds_per_candidate'] * 1e3:7.1f} ms/cand → {row['speed_ratio_vs_published']:7.0f}x, "
                      f"same {row['same_choice_as_published_on_subset']}, same as SLSQP-full {row['same_choice_as_slsqp_full_on_subset']}", flush=True)
    target = next((r for r in rows if r['D'] == 18 * 512 and r['pool'] == 40 and r['k'] == 5), None)
    summary = {
        'configurations': len(rows),
        'speed_ratio_vs_published_min': min(r['speed_ratio_vs_published'] for r in rows),
        'speed_ratio_vs_published_median': float(np.median([r['speed_ratio_vs_published'] for r in rows])),
        'same_choice_as_published_on_subset': sum(r['same_choice_as_published_on_subset'] for r in rows),
        'same_choice_as_slsqp_full_on_subset': sum(r['same_choice_as_slsqp_full_on_subset'] for r in rows),
        'greedy_not_worse_than_hull': sum(r['greedy_not_worse'] for r in rows),
        'greedy_speedup_vs_hull_min': min(r['greedy_speedup_vs_hull'] for r in rows),
        'greedy_speedup_vs_hull_median': float(np.median([r['greedy_speedup_vs_hull'] for r in rows])),
        'hull_seconds_pool40_k5_D9216': target['hull_seconds'] if target else None,
        'wall_seconds': time.perf_counter() - t_start}
    out = {'bench': 'replay', 'quick': a.quick, 'C': C, 'subset': n_sub, 'repeats': repeats,
           'threads': torch.get_num_threads(), 'cpus': os.cpu_count(), 'machine': platform.machine(), 'processor': platform.processor(),
           'python': sys.version.split()[0], 'torch': torch.__version__, 'numpy': np.__version__,
           'targets': {'speed_ratio_vs_published': '>= 100 with the same choice', 'hull C=5000 pool 40 k=5 D=9216 seconds': '<= 2',
                       'hull-greedy': 'score no worse than hull (C=5000) on most pools, in a tenth of its time'},
           'summary': summary, 'results': rows}
    path = Path(a.out); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp'); tmp.write_text(json.dumps(out, indent=1) + '\n'); os.replace(tmp, path)
    print(json.dumps(summary, indent=1)); print(f"wrote {path}")


if __name__ == '__main__':
    main()
