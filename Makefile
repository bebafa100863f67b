# LiveLM: `make run` serves the built-in demo model; `make test` runs the test suite.
# Each target installs what it needs into .venv first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.livelm-installed
HOST ?= 127.0.0.1
PORT ?= 8080
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch is pinned to the local CPU build when missing: a looser requirement would pull
# gigabytes of CUDA packages. setup.py itself accepts any torch>=2.4 (the GPU image has 2.11).
$(STAMP): setup.py pyproject.toml native/ring.c native/ring.h native/build_ring.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/livelm serve --model demo --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) perf/stream_bench.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info native/_ring*.so native/_ring.c .pytest_cache
