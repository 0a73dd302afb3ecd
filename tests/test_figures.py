"""The figures of a small finished grid speak one visual language: every trace of a strategy carries the colour the
strategy registry gives it, heat maps share orientation and colour scale, and the claims' forest plot colours each
verdict as its legend says."""
import numpy as np
import pytest

from facecl_nb import claims as CL, viz
from facecl_nb.grid import run_grid, summary_table
from facecl_nb.rundir import collect_results
from facecl_nb.strategies import STRATEGIES, strategy_style
from facecl_nb.synth import synth_album

MICRO = dict(tuning={'epochs': 1}, free={'steps': 3}, hull={'steps': 3}, n_synth=2, hull_candidates=10, metrics=('psnr', 'dlib_dist'))
quiet = lambda *a: None


@pytest.fixture(scope='module')
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp('albums')
    for p, s in (('ida', 1), ('jon', 2)):
        synth_album(root, p, timestamps=3, n_train=3, n_test=2, size=64, seed=s, log=quiet)
    out = tmp_path_factory.mktemp('grid')
    run_grid(root, ['ida', 'jon'], ['none', 'random', 'hull', 'joint'], [1, 2], [0, 1], out, T=3, overrides=MICRO, log=quiet)
    return collect_results(out)


def _strategy_of(name: str) -> str:
    "The registry name behind a trace's legend name ('ER-Hull' -> 'hull')."
    return next(n for n, s in STRATEGIES.items() if s.label == name)


def test_every_trace_of_a_strategy_has_its_colour(grid):
    assert len(grid) == 2 * 2 * (1 + 2 + 2 + 1)
    fig = viz.aip_af_vs_buffer(summary_table(grid, 'psnr'), 'psnr')
    seen = set()
    for tr in fig.data:
        st = _strategy_of(tr.name); seen.add(st)
        assert tr.legendgroup == st
        sty = strategy_style(st)
        assert tr.line.color == sty['color'], (tr.name, tr.line.color)
        if tr.error_y is not None and tr.error_y.array is not None: assert tr.error_y.color == sty['color']
        if 'markers' in (tr.mode or ''): assert tr.marker.color == sty['color'] and tr.marker.symbol == sty['symbol']
    assert seen == {'none', 'random', 'hull', 'joint'}
    assert sum(tr.showlegend is not False for tr in fig.data) == 4          # one legend entry per strategy


def test_heat_maps_share_orientation_and_scale(grid):
    one = [r for r in grid if r['person'] == 'ida' and r['seed'] == 0]
    rng = viz.metric_range(grid, 'psnr')
    fig = viz.r_heatmaps(one, 'psnr', zrange=rng)
    assert {(tr.zmin, tr.zmax) for tr in fig.data} == {rng}
    ys = [getattr(fig.layout, k) for k in fig.layout if k.startswith('yaxis')]
    assert ys and all(y.autorange == 'reversed' and y.title.text for y in ys)     # every panel: t downwards, labelled
    for r, ann in zip(viz.sort_runs(one), fig.layout.annotations):
        assert strategy_style(r['strategy'])['color'] in ann.text                   # each panel titled in its strategy's colour
    lo = viz.r_heatmaps(one, 'dlib_dist')
    assert all(tr.reversescale for tr in lo.data) and not any(tr.reversescale for tr in fig.data)   # the good end is yellow


def test_forest_plot_of_the_grid_claims(grid):
    t = CL.claims(CL.results_frame(grid), metrics=['psnr'], small=(1, 2), n_boot=500)
    fig = viz.claims_forest(t)
    means = [tr for tr in fig.data if tr.error_x is not None and tr.error_x.array is not None]
    assert len(means) == int(np.isfinite(t['mean']).sum())
    assert all(tr.marker.color == viz.VERDICT_COLOURS[tr.name] for tr in means)
    assert sum(len(tr.x) for tr in fig.data if tr not in means) == sum(len(v) for v in t['values'])


def test_legends_fit_their_figures(grid, tmp_path):
    "Drawn as save_figure exports them (the figure's own size), every legend of the grid's figures shows all its entries."
    from test_docs import CHROMIUM, _legend_overflow, sync_playwright
    if sync_playwright is None or CHROMIUM is None: pytest.skip("needs playwright and chromium")
    t = CL.claims(CL.results_frame(grid), metrics=['psnr', 'dlib_dist'], small=(1, 2), n_boot=200)
    replay = next(r for r in grid if r['strategy'] == 'hull' and r['buffer'] == 2)
    figs = {'aip_af_vs_buffer': viz.aip_af_vs_buffer(summary_table(grid, 'psnr'), 'psnr'),
            'claims_forest': viz.claims_forest(t),
            'buffer_composition': viz.buffer_composition(grid),
            'buffer_pca_panels': viz.buffer_pca_small_multiples(replay['run_dir'])}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page, cut = b.new_page(), {}
        for name, fig in figs.items():
            fig.write_html(str(tmp_path / f"{name}.html"), include_plotlyjs=True)
            bad = _legend_overflow(page, (tmp_path / f"{name}.html").as_uri(), (fig.layout.width or 1000, fig.layout.height or 600))
            if bad: cut[name] = bad
        b.close()
    assert not cut, f"legends taller than their figure: {cut}"


def test_a_strategy_from_fewer_runs_says_so_in_the_legend(grid):
    sub = [r for r in grid if not (r['strategy'] == 'random' and r['person'] == 'ida')]       # ER-Rand on one person only
    fig = viz.aip_af_vs_buffer(summary_table(sub, 'psnr'), 'psnr')
    names = {tr.legendgroup: tr.name for tr in fig.data if tr.showlegend is not False}
    assert names['random'] == f"{STRATEGIES['random'].label} (2 runs)", names
    assert names['hull'] == STRATEGIES['hull'].label and names['none'] == STRATEGIES['none'].label


@pytest.mark.skipif(viz.chromium_path() is None, reason='no Chromium on this machine: PNG export is skipped anyway')
def test_a_browser_that_does_not_start_leaves_png_export_failing_not_hanging(tmp_path):
    "The shared browser's probe fails, the figure's own export fails with an error in what `save_figure` returns, the process ends."
    import os, subprocess, sys
    code = ("import plotly.graph_objects as go\nfrom facecl_nb import viz\n"
            f"ok = viz.png_server(timeout=20)\nr = viz.save_figure(go.Figure(), {str(tmp_path / 'x')!r})\nprint('SHARED', ok, 'PNG', r['png'][:40])")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, env={**os.environ, 'BROWSER_PATH': '/bin/false'})
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'SHARED False PNG failed: ' in p.stdout, p.stdout
    assert (tmp_path / 'x.html').exists() and not (tmp_path / 'x.png').exists()
