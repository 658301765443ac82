# Two commands on a fresh machine: `make book` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MATHJAX_VERSION := 3.2.2
MATHJAX_DIR := book/_static/mathjax
MATHJAX := $(MATHJAX_DIR)/tex-chtml-full.js

# No progress bars (and so no widget state) in executed notebooks and logs.
# MPLBACKEND stays unset: the notebook kernels then draw with ipykernel's inline
# backend, so every figure is an image output and an image on the page
# (tests/test_figures.py counts them). Test processes choose Agg for themselves.
export VAELIB_PROGRESS := 0
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: help install book test lint format unit notebooks site browser clean constraints benchmarks mathjax

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# uv installs the environment several times faster than pip. It is used when it
# is on PATH, or else installed into the new environment from the package index
# (`make install UV=` keeps to pip). Same pins, same constraints.txt either way.
UV ?= $(shell command -v uv 2>/dev/null || echo bootstrap)
# uv does not read pip's configuration: pass on pip's --find-links (a folder of
# local wheels, such as a CPU build of torch), or uv would take torch from the
# index alone, where Linux wheels are CUDA builds of several GB.
FIND_LINKS ?= $(strip $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)))
UV_FIND_LINKS := $(foreach link,$(FIND_LINKS),--find-links $(link))

$(STAMP): pyproject.toml constraints.txt
	rm -f $(VENV)/.installer
	if [ -n "$(UV)" ]; then \
	  $(PYTHON) -m venv --without-pip $(VENV) 2>/dev/null || $(PYTHON) -m venv $(VENV); \
	  uv="$(UV)"; \
	  if [ "$$uv" = bootstrap ]; then \
	    $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(VENV)/uv-bootstrap uv && \
	    uv="$(VENV)/uv-bootstrap/bin/uv"; \
	  fi; \
	  VIRTUAL_ENV=$(CURDIR)/$(VENV) "$$uv" pip install --quiet --python $(PY) $(UV_FIND_LINKS) \
	    -c constraints.txt -e ".[book,dev]" pip && echo uv > $(VENV)/.installer || true; \
	fi
	if [ ! -f $(VENV)/.installer ]; then \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --quiet --upgrade pip && \
	  $(PY) -m pip install --quiet -c constraints.txt -e ".[book,dev]" && echo pip > $(VENV)/.installer; \
	fi
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vaelib)" >/dev/null
	cp $(VENV)/.installer $@

# The kernels' configuration (see the file): no "running over TCP" notice per notebook.
KERNEL_CONFIG := $(VENV)/etc/ipython/ipython_kernel_config.py
$(KERNEL_CONFIG): scripts/ipython_kernel_config.py $(STAMP)
	install -D -m 644 $< $@

install: $(STAMP) $(KERNEL_CONFIG)  ## create .venv with the pinned environment

mathjax: $(MATHJAX)  ## MathJax 3 under book/_static, served from the site itself

# The combined component (every TeX extension, CommonHTML output), its web fonts,
# and the accessibility code its menu loads on demand; nothing else of the package.
$(MATHJAX):
	npm install --silent --no-save --no-audit --no-fund --prefix .cache/mathjax mathjax@$(MATHJAX_VERSION)
	rm -rf .cache/mathjax/site $(MATHJAX_DIR)
	mkdir -p .cache/mathjax/site/output/chtml/fonts $(dir $(MATHJAX_DIR))
	cd .cache/mathjax/node_modules/mathjax/es5 && cp -r tex-chtml-full.js a11y sre ../../../site/ \
	  && cp -r output/chtml/fonts/woff-v2 ../../../site/output/chtml/fonts/
	mv .cache/mathjax/site $(MATHJAX_DIR)

# Both build what they can, then fail naming any notebook that did not execute.
book: $(STAMP) $(KERNEL_CONFIG) $(MATHJAX)  ## execute the notebooks and build the website into _build/html
	$(PY) scripts/build_book.py
	@echo "Open _build/html/index.html"

lint: $(STAMP)  ## ruff (lint and format, notebooks too), nbstripout, whitespace and YAML checks, mypy --strict
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure
	$(BIN)/mypy

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

unit: $(STAMP)  ## the unit tests
	$(BIN)/pytest -q -p no:cacheprovider

notebooks: $(STAMP) $(KERNEL_CONFIG)  ## execute every notebook with nbval
	$(BIN)/pytest -q -p no:cacheprovider --nbval-lax book/

site: $(STAMP) $(KERNEL_CONFIG) $(MATHJAX)  ## build the website from a clean _build, warnings as errors
	rm -rf _build
	$(PY) scripts/build_book.py -- -W -n

browser: $(STAMP)  ## open every page of the built site in headless Chromium
	$(BIN)/pytest -q -p no:cacheprovider -m browser tests/test_browser.py

test: lint unit notebooks site browser  ## everything CI runs

benchmarks: $(STAMP)  ## CPU benchmarks (see benchmarks/README.md)
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.book

constraints: $(STAMP)  ## re-lock constraints.txt from the current .venv
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' | sort -f > constraints.new
	mv constraints.new constraints.txt

clean:  ## remove the build, caches and the virtual environment
	rm -rf _build .venv .cache book/_static/mathjax .pytest_cache .ruff_cache
