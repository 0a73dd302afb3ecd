"""Replay-buffer selection benchmark: ER-Hull (C = 5000) and hull-greedy — selection time and achieved score — against
the authors' formulation of the ER-Hull score (the replay scripts released with the WACV 2025 paper "Continual Learning of
Personalized Generative Face Models with Experience Replay"), timed on a subset of the same candidates and extrapolated.

The authors' formulation, per candidate buffer S of k latents (`authors_score`):
  1. PCA fitted to the k buffer latents themselves with k−1 components — that subspace is exactly the affine hull of S
     (sklearn's PCA when installed, else numpy SVD: centre on the k points' mean, top k−1 right singular vectors);
  2. in those k−1 dims, the convex hull of the k projected latents with scipy's qhull (`ConvexHull`; `.equations` give
     A x + b ≤ 0);
  3. every pool item not in S is projected with that PCA; inside the hull (A y + b ≤ 1e-12) its closest point is itself,
     outside it one scipy SLSQP solve of min ‖x − y‖² s.t. A x + b ≤ 0, started at the hull's centroid (the mean of the k
     projected vertices); we pass analytic gradients of objective and constraints, which only makes SLSQP faster;
  4. the closest point is mapped back with the PCA's inverse transform and the distance measured in the FULL latent space
     (by Pythagoras the exact distance to conv(S) whenever SLSQP converges, as conv(S) lies in the affine hull of S);
  5. the distances are aggregated exactly as `hull_score` does: per timestamp the mean over its items not in S (a
     timestamp whose items are all in S takes the mean own spread of its buffer items), score = mean over timestamps.
Degenerate cases: k = 1 — the distance to the single latent; k = 2 — qhull needs ≥ 2 dims, so the hull in the 1-D PCA
space is the segment [min, max] written as the two inequalities x − max ≤ 0, min − x ≤ 0 and handled as in 3–4;
qhull refusing the k points (repeated or affinely dependent latents) — the same SLSQP problem over barycentric weights
(min ‖Vᵀλ − y‖² on the simplex, V the projected vertices), counted in `authors_qhull_fallbacks`.

On the subset we also score every candidate with SLSQP over barycentric weights in the full latent space (no PCA, no
qhull): a general solver of the exact problem. Our `hull_score` is exact to 1e-5, so "exact score" below means ours.

Pools of 20, 40, 60 items over 10 timestamps (a drifting centre per timestamp plus noise), D = 100 and D = 18×512,
k ∈ {3, 5, 10}. Times are wall-clock on this machine with torch's default threads (median of `--repeats` runs, after
one untimed warm-up of each method).

Usage: python bench/replay.py [--out bench/results/replay.json] [--quick | --short] [--subset N] [--repeats R]
"""
import argparse, json, os, platform, sys, time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.spatial import ConvexHull, QhullError

from facecl_nb.replay import select_buffer, hull_score, hull_scores, hull_candidates, _Pool, _prep

try: from sklearn.decomposition import PCA as _SkPCA
except ImportError: _SkPCA = None


def make_pool(P: int, D: int, T: int = 10, seed: int = 0):
    "P items over T timestamps: a drifting mean per timestamp plus unit noise."
    r = np.random.default_rng(seed)
    ts = np.sort(np.arange(P) % T)
    centres = np.cumsum(r.normal(size=(T, D)) * 0.5, axis=0)
    return centres[ts] + r.normal(size=(P, D)), ts


def _slsqp_dist(V: np.ndarray, p: np.ndarray) -> float:
    "One SLSQP solve of min ||Vᵀλ − p|| over the simplex (barycentric weights λ)."
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


def _pca(V: np.ndarray, n: int):
    "PCA of the rows of V to n components: (mean [D], components [n, D]); sklearn when installed, else numpy SVD."
    if _SkPCA is not None:
        p = _SkPCA(n_components=n, svd_solver='full').fit(V)
        return p.mean_, p.components_
    mu = V.mean(0)
    return mu, np.linalg.svd(V - mu, full_matrices=False)[2][:n]


def _closest_in_hull(A: np.ndarray, b: np.ndarray, y: np.ndarray, x0: np.ndarray):
    "SLSQP: the point x of {A x + b ≤ 0} closest to y, started at x0. (x, converged)."
    r = minimize(lambda x: float(np.sum((x - y) ** 2)), x0, jac=lambda x: 2 * (x - y), method='SLSQP',
                 constraints=[{'type': 'ineq', 'fun': lambda x: -(A @ x + b), 'jac': lambda x: -A}])
    return r.x, bool(r.success)


def authors_score(X: np.ndarray, ts, S, spread, stats: dict | None = None) -> float:
    "The authors' ER-Hull score of buffer S (see the module docstring); `stats` counts SLSQP solves, failures, qhull fallbacks."
    S = [int(i) for i in S]; k = len(S)
    st = stats if stats is not None else {}
    for key in ('slsqp_solves', 'slsqp_not_converged', 'qhull_fallbacks'): st.setdefault(key, 0)
    rest = [i for i in range(len(X)) if i not in set(S)]
    if k == 1:                                                # a single latent: its distance
        return _aggregate(ts, S, {i: float(np.linalg.norm(X[i] - X[S[0]])) for i in rest}, spread)
    mu, W = _pca(X[S], k - 1)                                 # the affine hull of S
    Z, Y = (X[S] - mu) @ W.T, (X[rest] - mu) @ W.T            # vertices and other items in the k−1 dims
    if k == 2: eq = np.array([[1.0, -Z.max()], [-1.0, Z.min()]])   # the segment: x − max ≤ 0, min − x ≤ 0
    else:
        try: eq = ConvexHull(Z).equations
        except (QhullError, ValueError): eq = None
    cen = Z.mean(0)
    dist = {}
    for i, y in zip(rest, Y):
        if eq is not None and np.all(eq[:, :-1] @ y + eq[:, -1] <= 1e-12): x = y
        elif eq is not None:
            x, ok = _closest_in_hull(eq[:, :-1], eq[:, -1], y, cen)
            st['slsqp_solves'] += 1; st['slsqp_not_converged'] += not ok
        else:                                                 # qhull refused: the same problem over barycentric weights
            st['qhull_fallbacks'] += 1
            r = minimize(lambda l: float(np.sum((l @ Z - y) ** 2)), np.full(k, 1 / k), jac=lambda l: 2 * (Z @ (l @ Z - y)),
                         method='SLSQP', bounds=[(0, 1)] * k,
                         constraints=[{'type': 'eq', 'fun': lambda l: l.sum() - 1, 'jac': lambda l: np.ones_like(l)}])
            l = np.clip(r.x, 0, None); x = (l / l.sum()) @ Z
            st['slsqp_solves'] += 1; st['slsqp_not_converged'] += not r.success
        dist[i] = float(np.linalg.norm(X[i] - (mu + x @ W)))  # inverse transform, distance in the full latent space
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


def run_one(P: int, D: int, k: int, C: int, n_sub: int, repeats: int, full_check: bool = True) -> dict:
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
    stats = {}
    t0 = time.perf_counter(); auth = np.array([authors_score(X, ts, s, spread, stats) for s in sub]); t_auth = (time.perf_counter() - t0) / len(sub)
    ours = hull_scores(Xt, ts, sub).numpy()                   # exact (to 1e-5)
    ia, io = int(np.argmin(auth)), int(np.argmin(ours))
    auth_total = t_auth * len(cands)                          # extrapolated to the candidates select_buffer scores
    row = {'D': D, 'pool': P, 'k': k, 'C': int(len(cands)),
           'hull_seconds': t_hull, 'hull_score': s_hull, 'hull_buffer': sorted(bh),
           'greedy_seconds': t_greedy, 'greedy_score': s_greedy, 'greedy_buffer': sorted(bg),
           'greedy_minus_hull_score': s_greedy - s_hull, 'greedy_not_worse': bool(s_greedy <= s_hull + 1e-9 * abs(s_hull)),
           'greedy_speedup_vs_hull': t_hull / t_greedy,
           'hull_scoring_seconds_all_candidates': t_score_all,
           'subset_size': int(len(sub)),
           'authors_seconds_per_candidate': t_auth, 'authors_extrapolated_seconds': auth_total,
           'speed_ratio_vs_authors': auth_total / t_hull,
           'same_choice_as_authors_on_subset': bool(ia == io),
           'authors_choice_exact_score': float(ours[ia]), 'our_choice_exact_score': float(ours[io]),
           'better_choice': 'same' if ia == io else ('ours' if ours[io] < ours[ia] else ('authors' if ours[ia] < ours[io] else 'tie')),
           'max_abs_score_diff_vs_authors': float(np.max(np.abs(auth - ours))),
           'max_rel_score_diff_vs_authors': float(np.max(np.abs(auth - ours) / np.abs(ours))),
           'rank_corr_with_authors_on_subset': spearman(auth, ours) if len(sub) > 2 else None,
           'authors_slsqp_solves': stats['slsqp_solves'], 'authors_slsqp_not_converged': stats['slsqp_not_converged'],
           'authors_qhull_fallbacks': stats['qhull_fallbacks'],
           'min_gap_between_best_two_on_subset': float(np.diff(np.sort(ours)[:2])[0]) if len(sub) > 1 else None}
    if full_check:
        t0 = time.perf_counter(); full = np.array([slsqp_full_score(X, ts, s, spread) for s in sub]); t_full = (time.perf_counter() - t0) / len(sub)
        row.update({'slsqp_full_seconds_per_candidate': t_full,
                    'same_choice_as_slsqp_full_on_subset': bool(np.argmin(full) == io),
                    'max_rel_diff_vs_slsqp_full': float(np.max(np.abs(full - ours) / np.abs(ours)))})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='bench/results/replay.json', help='where to write the JSON (default: %(default)s)')
    ap.add_argument('--quick', action='store_true', help='D = 100 only, pools 20 and 40, k 3 and 5, C = 500, subsets of 5')
    ap.add_argument('--short', action='store_true', help='every configuration at C = 5000, but 1 timed run each and no full-space SLSQP check')
    ap.add_argument('--subset', type=int, default=None, help='candidates scored the authors\' way per configuration (default 20; quick 5)')
    ap.add_argument('--repeats', type=int, default=None, help='timed runs per selection, median reported (default 3; quick, short 1)')
    a = ap.parse_args(argv)
    if a.quick and a.short: ap.error('--quick and --short exclude each other')
    pools = [20, 40] if a.quick else [20, 40, 60]
    dims = [100] if a.quick else [100, 18 * 512]
    ks = [3, 5] if a.quick else [3, 5, 10]
    C = 500 if a.quick else 5000
    n_sub = a.subset or (5 if a.quick else 20)
    repeats = a.repeats or (1 if a.quick or a.short else 3)
    full_check = not a.short
    Xw, tw = make_pool(20, 100, seed=7)                       # untimed warm-up: one-time torch/library start-up costs
    for name in ('hull', 'hull-greedy'): select_buffer(name, torch.tensor(Xw), tw, 3, seed=0, **({'C': 50} if name == 'hull' else {}))
    authors_score(Xw, tw, [0, 5, 10], _Pool(*_prep(torch.tensor(Xw), tw)).spread.numpy())
    rows, t_start = [], time.perf_counter()
    for D in dims:
        for P in pools:
            for k in ks:
                row = run_one(P, D, k, C, n_sub, repeats, full_check); rows.append(row)
                print(f"D={D:5d} pool={P:2d} k={k:2d} C={row['C']:4d} | hull {row['hull_seconds']:6.3f} s score {row['hull_score']:9.4f} | "
                      f"greedy {row['greedy_seconds']:6.3f} s ({row['greedy_speedup_vs_hull']:4.1f}x) | "
                      f"authors {row['authors_seconds_per_candidate'] * 1e3:7.1f} ms/cand → {row['speed_ratio_vs_authors']:7.0f}x, "
                      f"same {row['same_choice_as_authors_on_subset']} (better: {row['better_choice']}), "
                      f"max |Δscore| {row['max_abs_score_diff_vs_authors']:.2e}", flush=True)
    target = next((r for r in rows if r['D'] == 18 * 512 and r['pool'] == 40 and r['k'] == 5), None)
    diff = [r for r in rows if not r['same_choice_as_authors_on_subset']]
    ratios = [r['speed_ratio_vs_authors'] for r in rows]
    summary = {
        'configurations': len(rows),
        'same_choice_as_authors_on_subset': sum(r['same_choice_as_authors_on_subset'] for r in rows),
        'where_choices_differ_lower_exact_score': {w: sum(r['better_choice'] == w for r in diff) for w in ('ours', 'authors', 'tie')},
        'where_choices_differ_max_exact_score_gap': max((abs(r['authors_choice_exact_score'] - r['our_choice_exact_score']) for r in diff), default=None),
        'max_abs_score_diff_vs_authors': max(r['max_abs_score_diff_vs_authors'] for r in rows),
        'max_rel_score_diff_vs_authors': max(r['max_rel_score_diff_vs_authors'] for r in rows),
        'authors_slsqp_not_converged': sum(r['authors_slsqp_not_converged'] for r in rows),
        'authors_slsqp_solves': sum(r['authors_slsqp_solves'] for r in rows),
        'authors_qhull_fallbacks': sum(r['authors_qhull_fallbacks'] for r in rows),
        'speed_ratio_vs_authors_min': min(ratios),
        'speed_ratio_vs_authors_median': float(np.median(ratios)),
        'speed_ratio_vs_authors_max': max(ratios),
        'same_choice_as_slsqp_full_on_subset': sum(r['same_choice_as_slsqp_full_on_subset'] for r in rows) if full_check else None,
        'greedy_not_worse_than_hull': sum(r['greedy_not_worse'] for r in rows),
        'greedy_speedup_vs_hull_min': min(r['greedy_speedup_vs_hull'] for r in rows),
        'greedy_speedup_vs_hull_median': float(np.median([r['greedy_speedup_vs_hull'] for r in rows])),
        'hull_seconds_pool40_k5_D9216': target['hull_seconds'] if target else None,
        'wall_seconds': time.perf_counter() - t_start}
    out = {'bench': 'replay', 'quick': a.quick, 'short': a.short, 'C': C, 'subset': n_sub, 'repeats': repeats,
           'reference': "authors' formulation: per-candidate PCA to k-1 dims, qhull, SLSQP per outside point, distance in full space",
           'pca': 'sklearn' if _SkPCA is not None else 'numpy SVD',
           'threads': torch.get_num_threads(), 'cpus': os.cpu_count(), 'machine': platform.machine(), 'processor': platform.processor(),
           'python': sys.version.split()[0], 'torch': torch.__version__, 'numpy': np.__version__,
           'targets': {'speed_ratio_vs_authors': '>= 100 with the same choice', 'hull C=5000 pool 40 k=5 D=9216 seconds': '<= 2',
                       'hull-greedy': 'score no worse than hull (C=5000) on most pools, in a tenth of its time'},
           'summary': summary, 'results': rows}
    path = Path(a.out); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp'); tmp.write_text(json.dumps(out, indent=1) + '\n'); os.replace(tmp, path)
    print(json.dumps(summary, indent=1)); print(f"wrote {path}")


if __name__ == '__main__':
    main()
