"""Sphinx configuration for the facecl course website.

Build (offline, no notebook is executed; the outputs stored in the notebooks are shown):

    python -m sphinx -b html -c docs nbs docs/_build/html      # or: make docs

The source folder is nbs/ itself: the notebooks are read in place, nothing is copied. This file lives in
docs/ (hence `-c docs`). At read time each notebook is preprocessed in memory (the `source-read` hook below):

* nbdev directives become myst-nb cell tags: `#| hide`, `#| default_exp` and `#| include: false` remove the
  cell; `#| echo: false` removes the input, `#| output: false` the output; `#| exporti` and
  `#| code-fold: true` collapse the input. The directive lines themselves are not shown; `#| hide_line` lines
  are dropped (as nbdev does).
* Jupyter's collapsed-cell metadata (`"jupyter": {"source_hidden": true}` / `{"outputs_hidden": true}`) become
  `hide-input` / `hide-output` (both: `hide-cell`); tags `hide-cell`, `hide-input`, ... work as they are.
* Interactive outputs that would need JavaScript from the network are made offline: a plotly figure shows its
  stored PNG when the output has one, else it is drawn by the plotly.js of the installed plotly package (copied
  into _static, loaded only by the pages that need it); ipywidgets outputs become a one-line note.
* The home page (index.ipynb) gets the sidebar's toctrees, in the course order of `COURSE` below; chapters
  whose notebook does not exist (yet) are left out.

ERROR-level messages fail the build (exit status 1, after the whole build ran and listed them); warnings do not.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from sphinx.errors import SphinxError

# ---- the course order: (caption, [docnames relative to nbs/, without .ipynb]) --------------------------------
COURSE = [
    ("Start", ["index"]),
    ("Course", ["00_continual_learning", "01_data", "01a_faces", "01b_synth", "02_generators", "02b_encoders", "03_inversion", "03a_projector", "04a_hull", "04_replay",
                "05_metrics", "05a_evaluation", "05b_profiles", "05c_strategies", "06_continual", "06a_rundir", "06c_grid", "06b_claims", "06d_experiments", "07_cameras", "07a_prior3d", "07b_anchors3d", "07c_adversarial", "08_viz", "09_cli"]),
    ("Experiments", ["experiments/continual_2d", "experiments/continual_3d", "experiments/explorer"]),
    ("Appendix: foundations and layers", ["90_core", "90a_install", "91_stylegan2", "92_eg3d", "93_dlib_resnet", "94_irse50", "95_dual_discriminator"]),
]

NBS = (Path(__file__).resolve().parent.parent / "nbs").resolve()


def course_docs(nbs: Path = NBS) -> list[tuple[str, list[str]]]:
    "COURSE with the chapters whose notebook is absent left out."
    return [(cap, [d for d in docs if (nbs / f"{d}.ipynb").is_file()]) for cap, docs in COURSE]


# ---- project --------------------------------------------------------------------------------------------------
project = "facecl"
author = "facecl developers"
copyright = "2026 onwards, facecl developers"
root_doc = "index"
smartquotes = False          # titles stay as written in the notebooks

extensions = ["myst_nb"]

# only the course notebooks: nbs/runs, nbs/data, checkpoints and any other notebook are not part of the site
include_patterns = [f"{d}.ipynb" for _, docs in COURSE for d in docs]
exclude_patterns = ["runs", "data", "**/.ipynb_checkpoints", "_build", "**/_build"]

# ---- myst-nb: show the stored outputs, never execute -----------------------------------------------------------
nb_execution_mode = "off"
nb_merge_streams = True
nb_ipywidgets_js = {}            # no require.js / widget manager from a CDN: the site is offline
nb_render_markdown_format = "myst"   # Markdown outputs (the tables the notebooks print) rendered as MyST: tables are tables
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# ---- HTML -------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "facecl"
html_favicon = "favicon.svg"     # also spares browsers a /favicon.ico 404
html_theme_options = {
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": False,
}
html_context = {"default_mode": "auto"}    # pydata-sphinx-theme otherwise logs "Got invalid theme mode" as a console error
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["facecl.css"]

# ---- notebook preprocessing (nbdev directives -> myst-nb tags) ---------------------------------------------------
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*(:?)\s*(.*?)\s*$")
_HIDE_LINE = re.compile(r"#\|\s*hide_line\s*$", re.MULTILINE)
_PLOTLY = "application/vnd.plotly.v1+json"
_INTERACTIVE = (_PLOTLY, "application/vnd.jupyter.widget-view+json")
_NOTE = "*(Interactive figure: not shown in the static site; run the notebook to see it.)*"


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _directives(source: str) -> tuple[dict[str, str], str]:
    "nbdev-style directives at the top of a cell ({name: value}) and the source without them."
    lines, dirs, i = source.splitlines(), {}, 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            dirs[m.group(1).lower()] = m.group(3).lower() if m.group(2) else ""
        elif line.strip():
            break
        i += 1
    body = [l for l in lines[i:] if not _HIDE_LINE.search(l)]
    return dirs, "\n".join(body)


_TEST_LINE = re.compile(r"^\s*(test_eq|test_fail|test_close|test_ne|test_is|assert\b|with pytest\.raises|with ExceptionExpected)")


def is_test_cell(cell) -> bool:
    "A cell of tests (no output; at least half of its code lines are assertions): collapsed on the site, still run by nbdev_test."
    if cell.get("cell_type") != "code" or cell.get("outputs"): return False
    lines = [l for l in _src(cell).splitlines() if l.strip() and not l.lstrip().startswith("#")]
    return bool(lines) and sum(bool(_TEST_LINE.match(l)) for l in lines) >= len(lines) / 2


def _tags_for(dirs: dict[str, str]) -> set[str]:
    tags = set()
    if {"hide", "default_exp"} & dirs.keys() or dirs.get("include") == "false": tags.add("remove-cell")
    if dirs.get("echo") == "false": tags.add("remove-input")
    if dirs.get("output") == "false": tags.add("remove-output")
    if "exporti" in dirs or dirs.get("code-fold") in ("true", "show"): tags.add("hide-input")
    return tags


def _plotly_html(fig: dict, uid: str) -> str:
    "A stored plotly figure as a div drawn by the plotly.js copied into _static (no CDN)."
    spec = json.dumps({k: fig.get(k, {} if k != "data" else []) for k in ("data", "layout", "config")})
    spec = spec.replace("</", "<\\/")
    return (f'<div id="{uid}" class="facecl-plotly"></div>\n<script>window.addEventListener("load", function () {{ '
            f'var f = {spec}; f.config.responsive = true; Plotly.newPlot("{uid}", f.data, f.layout, f.config); }});</script>')


def _static_output(out: dict, uid: str) -> dict:
    "An output that needs no JavaScript from the network: its stored image, a plotly figure drawn offline, or a note."
    data = out.get("data") or {}
    if not any(k in data for k in _INTERACTIVE): return out
    keep = {k: v for k, v in data.items() if k in ("image/png", "image/jpeg", "image/svg+xml")}
    if not keep and isinstance(data.get(_PLOTLY), dict): keep = {"text/html": _plotly_html(data[_PLOTLY], uid)}
    return dict(out, data=keep or {"text/markdown": _NOTE})


def _root_paths(src: str) -> str:
    "Markdown of the README (paths from the repository root) with its links as the site's home page needs them."
    src = re.sub(r"\]\((figures/)", r"](../\1", src)                          # figures: beside the docs folder
    return re.sub(r"\]\(nbs/([^)]+)\.ipynb\)", r"](\1.ipynb)", src)             # chapters: pages of this site


def preprocess_notebook(text: str, docname: str, course: list[tuple[str, list[str]]] | None = None) -> str:
    "The notebook JSON `text` with nbdev directives mapped to myst-nb tags (and, for the root, the toctrees)."
    try: nb = json.loads(text)
    except json.JSONDecodeError as e: raise DocsBuildError(f"{docname}.ipynb is not valid notebook JSON: {e}") from None
    for ci, cell in enumerate(nb.get("cells", [])):
        md = cell.setdefault("metadata", {})
        tags = set(md.get("tags") or [])
        if cell.get("cell_type") == "code":
            dirs, body = _directives(_src(cell))
            if dirs or _HIDE_LINE.search(_src(cell)): cell["source"] = body
            tags |= _tags_for(dirs)
            if is_test_cell(cell) and "remove-cell" not in tags: tags.add("hide-cell")     # tests: one click away, not in the way
            uid = "plotly-" + re.sub(r"\W", "-", docname) + f"-{ci}"
            cell["outputs"] = [_static_output(o, f"{uid}-{oi}") for oi, o in enumerate(cell.get("outputs", []))]
        if cell.get("cell_type") == "markdown" and docname == root_doc:     # the README's image paths are from the repository root
            cell["source"] = _root_paths(_src(cell))
        if cell.get("cell_type") == "code" and docname == root_doc:         # and so are those of the Markdown its hidden cells print
            for o in cell.get("outputs", []):
                d = o.get("data") or {}
                if "text/markdown" in d:
                    md_text = d["text/markdown"]
                    d["text/markdown"] = _root_paths("".join(md_text) if isinstance(md_text, list) else md_text)
        jup = md.get("jupyter") or {}
        if jup.get("source_hidden") and jup.get("outputs_hidden"): tags.add("hide-cell")
        elif jup.get("source_hidden"): tags.add("hide-input")
        elif jup.get("outputs_hidden"): tags.add("hide-output")
        if "remove-cell" in tags: tags -= {"hide-cell", "hide-input", "hide-output"}
        if tags: md["tags"] = sorted(tags)
    if docname == root_doc:
        blocks = []
        for cap, docs in course if course is not None else course_docs():
            entries = ["self" if d == root_doc else d for d in docs]
            if entries:
                blocks.append("```{toctree}\n:hidden:\n:maxdepth: 1\n:caption: " + cap + "\n\n" + "\n".join(entries) + "\n```")
        nb["cells"].append({"cell_type": "markdown", "id": "facecl-docs-toctree", "metadata": {}, "source": "\n\n".join(blocks)})
    return json.dumps(nb)


def _source_read(app, docname, source):
    if app.env.doc2path(docname).suffix != ".ipynb": return
    source[0] = preprocess_notebook(source[0], docname, course_docs(Path(app.srcdir)))


# ---- errors fail the build, warnings do not ---------------------------------------------------------------------
class DocsBuildError(SphinxError):
    category = "facecl docs build failed"


class _ErrorCounter(logging.Handler):
    "Counts ERROR/CRITICAL records of Sphinx's loggers (once each: Sphinx re-emits buffered records)."
    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.seen = set()

    def emit(self, record):
        self.seen.add((record.levelno, record.getMessage(), str(getattr(record, "location", ""))))


def _build_finished(app, exception):
    logging.getLogger("sphinx").removeHandler(app._facecl_errors)
    n = len(app._facecl_errors.seen)
    if exception is None and n:
        app.statuscode = 1                                   # sphinx-build's exit status
        env = Path(app.doctreedir) / "environment.pickle"    # re-read everything next time, so the errors show again
        if env.is_file(): env.unlink()
        print(f"facecl docs: the build logged {n} error(s) (see above): exit status 1", file=sys.stderr)


def _plotly_js(app, pagename, templatename, context, doctree):
    "plotly.js (from the plotly package, copied to _static) on the pages that draw a stored plotly figure."
    if 'class="facecl-plotly"' in context.get("body", ""):
        app.add_js_file("plotly.min.js")
        app._facecl_plotly = True


def _copy_plotly_js(app, exception):
    if exception is None and getattr(app, "_facecl_plotly", False):
        import shutil, plotly
        shutil.copyfile(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                        Path(app.outdir) / "_static" / "plotly.min.js")


def _reread_all_on_change(app, env, added, changed, removed):
    "Every page carries the sidebar (chapter list and titles): when any notebook changed, re-read and rewrite them all."
    return sorted(env.found_docs) if (added or changed or removed) else []


def setup(app):
    app._facecl_errors = _ErrorCounter()
    logging.getLogger("sphinx").addHandler(app._facecl_errors)
    app.connect("source-read", _source_read)
    app.connect("env-get-outdated", _reread_all_on_change)
    app.connect("html-page-context", _plotly_js)
    app.connect("build-finished", _copy_plotly_js)
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
