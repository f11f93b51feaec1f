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
# processes do not oversubscribe the cores (docs/benchmarks.md, "Slowest tests"). `loadgroup`:
# the tests of a module marked `xdist_group` run in one worker, which builds its module-scoped
# fixture (a trained run) once.
PYTEST_WORKERS ?= auto
BIN := $(VENV)/bin
# The project and its requirements are installed by uv (`uv pip install`, from PyPI; about twice
# as fast as pip for the ~100 packages of the test extras), torch by pip: pip finds a torch build
# that lies on the machine (`--find-links`, pip.conf) and honours pip's own index settings, where
# uv would download the CUDA build of PyPI. uv keeps the torch it finds installed.
UV := $(BIN)/uv

.PHONY: demo test lint install install-test clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, as the user chose it: uv then keeps it for the project's `torch>=` requirement
# (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	touch $@

$(UV): | $(BIN)/python
	$(BIN)/python -m pip install -q uv

$(VENV)/.installed: pyproject.toml $(VENV)/.torch | $(UV)
	$(UV) pip install -q --python $(BIN)/python -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(UV) pip install -q --python $(BIN)/python -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/ulframe run gin/quickstart.gin --workdir $(WORKDIR)
	$(BIN)/ulframe eval $(WORKDIR)
	$(BIN)/ulframe sample $(WORKDIR) -n 100

test: install-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check ulframe plugins tests benchmarks
	$(BIN)/ruff format --check ulframe plugins tests benchmarks
	$(BIN)/mypy
	$(BIN)/python tools/check_rules.py

docs: install
	ULFRAME_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/ulframe plugins --markdown > docs/gin_reference.md

clean:
	rm -rf $(VENV) runs build *.egg-info
