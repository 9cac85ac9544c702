# Everyday targets. `make test` and `make bench` work on a fresh clone: they create or refresh
# the local virtual environment .venv first (idempotent: a stamp file tracks its inputs).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test bench lint format info clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt setup.py pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(VPY) benchmarks/bench.py

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: venv
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

info: venv
	$(VPY) -m fused_ls.info

clean:
	rm -rf build *.egg-info fused_ls/*.so bench_out
