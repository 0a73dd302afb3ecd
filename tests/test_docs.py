"""The course website (`make docs`): built offline from the notebooks' stored outputs, then opened in headless Chromium.

The site is built into a temporary folder with the same command as `make docs` (docs/conf.py, sources nbs/), served
from 127.0.0.1 by a thread, and checked in the browser: the home page and its sidebar in course order, the figures of
the toy chapter (00_continual_learning, when it exists) and of the replay chapter, no console or page errors, and no
request leaving the machine. The browser tests skip only where playwright or a chromium executable is absent.
"""
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_browser = pytest.mark.skipif(
    sync_playwright is None or CHROMIUM is None,
    reason="docs browser test skipped: " + ("the playwright package is not installed" if sync_playwright is None
                                            else "no chromium executable on PATH (apt-get install chromium)"))


def _conf():
    "docs/conf.py as a module (for COURSE, course_docs and preprocess_notebook)."
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[dev]')")
    spec = importlib.util.spec_from_file_location("facecl_docs_conf", ROOT / "docs" / "conf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _title(nb_path: Path) -> str:
    "The notebook's title: its first markdown `# Title` line, as plain text."
    for cell in json.loads(nb_path.read_text())["cells"]:
        if cell["cell_type"] != "markdown": continue
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("# "): return re.sub(r"[`*_]", "", line[2:]).strip()
    raise AssertionError(f"{nb_path} has no '# Title' markdown line")


# ---- fast checks of the notebook preprocessing (no build, no browser) -----------------------------------------------
def _code(src, **md): return {"cell_type": "code", "metadata": md, "source": src, "outputs": [], "execution_count": None}


def test_preprocess_maps_nbdev_directives_to_tags():
    conf = _conf()
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        _code("#| default_exp data"), _code("#| hide\nimport pytest"), _code("#| export\ndef f(): pass"),
        _code("#| echo: false\nx = 1"), _code("#|exporti\ny = 2"), _code("z = 3  #| hide_line\nw = 4"),
        _code("solution = 42", jupyter={"source_hidden": True}), _code("s2 = 1", tags=["hide-cell"]),
        _code("fig", **{}), _code("w", **{})]}
    nb["cells"][8]["outputs"] = [{"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.plotly.v1+json": {"data": [{"type": "scatter", "x": [1], "y": [2]}], "layout": {}},
        "text/html": '<script src="https://cdn.plot.ly/plotly.min.js"></script>'}}]
    nb["cells"][9]["outputs"] = [{"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": "m"}, "text/plain": "IntSlider()"}}]
    out = json.loads(conf.preprocess_notebook(json.dumps(nb), "01_data"))["cells"]
    tags = [c["metadata"].get("tags", []) for c in out]
    assert tags[:8] == [["remove-cell"], ["remove-cell"], [], ["remove-input"], ["hide-input"], [], ["hide-input"],
                        ["hide-cell"]]
    assert out[2]["source"] == "def f(): pass" and out[5]["source"] == "w = 4"     # directive lines not shown
    html = out[8]["outputs"][0]["data"]
    assert list(html) == ["text/html"] and "Plotly.newPlot" in html["text/html"] and "cdn.plot.ly" not in html["text/html"]
    assert list(out[9]["outputs"][0]["data"]) == ["text/markdown"]                   # widget: a note, no CDN script


def test_home_toctree_follows_course_order():
    conf = _conf()
    course = [("Start", ["index"]), ("Course", ["01_data", "04_replay"]), ("Experiments", [])]
    text = json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []})
    md = json.loads(conf.preprocess_notebook(text, "index", course))["cells"][-1]["source"]
    assert md.index(":caption: Start") < md.index("self") < md.index(":caption: Course") < md.index("01_data") \
        < md.index("04_replay") and "Experiments" not in md


# ---- the built site in a browser -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for mod in ("sphinx", "myst_nb", "sphinx_book_theme"): pytest.importorskip(mod, reason=f"{mod} is not installed")
    out = tmp_path_factory.mktemp("docs")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(ROOT / "docs"),
                        "-d", str(out / "doctrees"), str(NBS), str(out / "html")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"docs build failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(f"docs built in {time.perf_counter() - t0:.1f} s")
    assert (out / "html" / "index.html").is_file()
    return out / "html"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def base_url(site):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, url):
    "A loaded page, with its console errors, page errors and requests that left 127.0.0.1."
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, external = [], []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: external.append(r.url)
            if urlparse(r.url).scheme in ("http", "https") and urlparse(r.url).hostname != "127.0.0.1" else None)
    resp = page.goto(url, wait_until="load")
    assert resp is not None and resp.ok, f"{url}: HTTP {resp.status if resp else 'no response'}"
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=15000)
    page.wait_for_timeout(300)                           # late script errors (theme, plotly) get reported
    return page, errors, external


@needs_browser
def test_home_page_and_sidebar_in_course_order(site, base_url, browser):
    conf = _conf()
    page, errors, external = _open(browser, base_url + "index.html")
    home = _title(NBS / "index.ipynb")
    assert home in page.title()
    assert page.locator("article h1").first.inner_text().strip().rstrip("#").strip() == home
    nav = page.locator("nav.bd-docs-nav")
    expected = [(cap, docs) for cap, docs in conf.course_docs(NBS) if docs]
    assert [c.strip() for c in nav.locator("p.caption").all_inner_texts()] == [cap for cap, _ in expected]
    links = nav.locator("a.reference.internal")
    hrefs = [urljoin(base_url + "index.html", links.nth(i).get_attribute("href")) for i in range(links.count())]
    docs = [d for _, ds in expected for d in ds]
    assert hrefs == [base_url + f"{d}.html" for d in docs], "sidebar order differs from the course order"
    texts = [t.strip() for t in links.all_inner_texts()]
    assert texts == [_title(NBS / f"{d}.ipynb") for d in docs]
    assert not errors, errors
    assert not external, f"the site is not offline; it requested: {external}"
    page.close()


@needs_browser
@pytest.mark.parametrize("chapter", ["00_continual_learning", "04_replay"])
def test_chapter_renders_with_images(site, base_url, browser, chapter):
    nb = NBS / f"{chapter}.ipynb"
    if not nb.exists(): pytest.skip(f"nbs/{chapter}.ipynb does not exist (yet): its page is not checked")
    page, errors, external = _open(browser, base_url + f"{chapter}.html")
    assert page.locator("article h1").first.inner_text().strip().rstrip("#").strip() == _title(nb)
    imgs = page.evaluate("Array.from(document.querySelectorAll('article img'))"
                         ".map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    stored = sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})
                 for c in json.loads(nb.read_text())["cells"] for o in c.get("outputs", []))
    assert any(ok for _, ok in imgs), (f"{chapter}: no loaded <img> on the page (images: {imgs}); the notebook "
                                       f"stores {stored} PNG/JPEG output(s): run it and save it with its outputs")
    broken = [src for src, ok in imgs if not ok]
    assert not broken, f"{chapter}: images that did not load: {broken}"
    directive_blocks = page.evaluate("Array.from(document.querySelectorAll('article .cell_input pre'))"
                                     ".filter(p => p.textContent.trimStart().startsWith('#|')).length")
    assert directive_blocks == 0, "nbdev directive lines are shown in code cells"
    assert not errors, errors
    assert not external, f"the site is not offline; it requested: {external}"
    page.close()


def _course_notebooks():
    conf = _conf()
    return [NBS / f"{d}.ipynb" for _, docs in conf.course_docs(NBS) for d in docs if (NBS / f"{d}.ipynb").exists()]


def _output_texts(nb_path: Path):
    "(cell index, output type, text) of every stored text output a reader sees (HTML markup is not counted)."
    for i, cell in enumerate(json.loads(nb_path.read_text())["cells"]):
        for o in cell.get("outputs", []):
            if "text" in o: yield i, o.get("output_type"), "".join(o["text"])
            for k in ("text/plain", "text/markdown"):
                v = (o.get("data") or {}).get(k)
                if v is not None: yield i, k, "".join(v) if isinstance(v, list) else v


def test_outputs_are_short_and_name_no_machine_paths():
    "A stored output over ~100 lines is a dump, not a lesson; a path of the machine that ran it means nothing to a reader."
    long, paths = [], []
    for nb in _course_notebooks():
        for i, kind, text in _output_texts(nb):
            if text.count("\n") > 100: long.append(f"{nb.name} cell {i}: {text.count(chr(10))} lines")
            for pat in (str(ROOT), "/root/", "/tmp/", "/home/"):
                if pat in text: paths.append(f"{nb.name} cell {i}: {pat}")
    assert not long, long
    assert not paths, paths


def test_markdown_tables_are_displayed_not_printed():
    "A Markdown table printed as text shows as one line of pipes on the site: display(Markdown(...)) renders it."
    sep = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$", re.MULTILINE)
    raw = [f"{nb.name} cell {i}" for nb in _course_notebooks() for i, kind, text in _output_texts(nb) if kind == "stream" and sep.search(text)]
    assert not raw, raw


def test_test_cells_are_collapsed_on_the_site():
    conf = _conf()
    assert conf.is_test_cell(_code("test_eq(f(1), 2)\nassert g()\n# a comment"))
    assert not conf.is_test_cell(_code("x = f(1)\ny = g(x)\nassert y"))
    out = json.loads(conf.preprocess_notebook(json.dumps({"cells": [_code("test_eq(1, 1)"), _code("print(1)")], "metadata": {}}), "some_chapter", []))
    assert out["cells"][0]["metadata"].get("tags") == ["hide-cell"] and "tags" not in out["cells"][1]["metadata"]


@needs_browser
@pytest.mark.parametrize("page_name", ["index", "06b_claims", "experiments/continual_2d"])
def test_markdown_outputs_render_as_tables(site, base_url, browser, page_name):
    "Tables the notebooks display as Markdown (results, claims) are HTML tables on the site, never raw '|---|' text."
    page, errors, _ = _open(browser, base_url + f"{page_name}.html")
    text = page.evaluate("(() => { const a = document.querySelector('article').cloneNode(true); "
                         "a.querySelectorAll('div.highlight, pre, code').forEach(e => e.remove()); return a.innerText; })()")   # prose and outputs, not code
    assert not re.search(r"\|\s*-{3,}\s*\|", text), f"{page_name}: raw Markdown table text on the page"
    if page_name != "index" or (ROOT / "figures" / "full" / "claims.md").exists():
        assert page.locator("article table").count() > 0, f"{page_name}: no table rendered"
    page.close()


# ---- figures: a legend that does not fit is cut (plotly scrolls it in a page, and a PNG export shows only its top) ----
_LEGEND_JS = """() => [...document.querySelectorAll('g.legend')].map(l => {
    const box = l.querySelector('.scrollbox'), bg = l.querySelector('rect.bg');
    return {content: box ? box.getBBox().height : 0, visible: bg ? bg.getBBox().height : 0,
            entries: l.querySelectorAll('g.traces').length};})"""


def _legend_overflow(page, url, size):
    "Legends of the plotly figure at `url` drawn at `size` (w, h) whose entries are taller than the space they are given."
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.goto(url, wait_until="load")
    page.wait_for_selector("g.main-svg, svg.main-svg", timeout=15000)
    page.wait_for_timeout(200)
    return [l for l in page.evaluate(_LEGEND_JS) if l["content"] > l["visible"] + 1]


def _figure_size(html: Path):
    "The size the figure's PNG was written at (the PNG beside it), else save_figure's default."
    png = html.with_suffix(".png")
    if png.exists():
        from PIL import Image
        with Image.open(png) as im: return im.size
    return (1000, 600)


def _committed_figures():
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "figures"], capture_output=True, text=True)
    return [ROOT / f for f in r.stdout.split() if f.endswith(".html")] if r.returncode == 0 else sorted((ROOT / "figures").rglob("*.html"))


@needs_browser
def test_legend_check_detects_a_cut_legend(browser, tmp_path):
    "The check below is not blind: 20 entries in a 300-px figure overflow, 4 do not."
    import plotly.graph_objects as go
    page = browser.new_page()
    for n, cut in ((20, True), (4, False)):
        fig = go.Figure([go.Scatter(x=[0, 1], y=[i, i], name=f"trace {i}") for i in range(n)]).update_layout(width=500, height=300)
        fig.write_html(str(tmp_path / f"f{n}.html"), include_plotlyjs=True)
        assert bool(_legend_overflow(page, (tmp_path / f"f{n}.html").as_uri(), (500, 300))) == cut
    page.close()


@needs_browser
def test_committed_figures_have_whole_legends(browser):
    "Every committed figure, drawn at the size of its PNG, shows all its legend entries (none scrolled out of view)."
    figs = _committed_figures()
    if not figs: pytest.skip("no committed plotly figures (figures/**/*.html)")
    page = browser.new_page()
    cut = {}
    for html in figs:
        bad = _legend_overflow(page, html.as_uri(), _figure_size(html))
        if bad: cut[str(html.relative_to(ROOT))] = bad
    page.close()
    assert not cut, f"legends taller than their figure (entries cut in the PNG): {cut}"
