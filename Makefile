# ulframe: two commands on a fresh machine.
#   make demo   create .venv, install, train the quickstart on handwritten digits (both stages),
#               evaluate it and draw 10 guided samples of every digit
#   make test   create .venv, install with test extras, run the test suite
#   make lint   ruff (lint + format check), mypy (ulframe/ and plugins/), the project's rules
# Pick another torch build with TORCH_SPEC, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core, each with one BLAS/OpenMP thread, so that the
# processes do not oversubscribe the cores (docs/benchmarks.md, "Slowest tests").
PYTEST_WORKERS ?= auto
BIN := $(VENV)/bin

.PHONY: demo test lint install install-test clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, as the user chose it: pip then keeps it for the project's `torch>=` requirement
# (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/ulframe run gin/quickstart.gin --workdir $(WORKDIR)
	$(BIN)/ulframe eval $(WORKDIR)
	$(BIN)/ulframe sample $(WORKDIR) -n 100

test: install-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check ulframe plugins tests benchmarks
	$(BIN)/ruff format --check ulframe plugins tests benchmarks
	$(BIN)/mypy
	$(BIN)/python tools/check_rules.py

docs: install
	ULFRAME_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/ulframe plugins --markdown > docs/gin_reference.md

clean:
	rm -rf $(VENV) runs build *.egg-info
