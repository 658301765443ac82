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
export VAELIB_PROGRESS := 0
export MPLBACKEND := Agg
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: help install book test lint format unit notebooks site browser clean constraints benchmarks mathjax

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[book,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vaelib)" >/dev/null
	touch $@

install: $(STAMP)  ## create .venv with the pinned environment

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

book: $(STAMP) $(MATHJAX)  ## execute the notebooks and build the website into _build/html
	$(BIN)/jupyter-book build . --keep-going
	@echo "Open _build/html/index.html"

lint: $(STAMP)  ## ruff (lint and format, notebooks too), nbstripout, whitespace and YAML checks
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

unit: $(STAMP)  ## the unit tests
	$(BIN)/pytest -q -p no:cacheprovider

notebooks: $(STAMP)  ## execute every notebook with nbval
	$(BIN)/pytest -q -p no:cacheprovider --nbval-lax book/

site: $(STAMP) $(MATHJAX)  ## build the website from a clean _build, warnings as errors
	rm -rf _build
	$(BIN)/jupyter-book build . -W -n --keep-going

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
