# Two entry points for a fresh Debian machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-slow setup data dist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

$(FMNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

data: $(FMNIST)

demo: setup data
	$(VENV)/bin/cachetrain train --config fmnist

# two workers (pytest-xdist): many tests wait on subprocesses, torchrun and the S3 server, so two share the
# two cores well. `make test` leaves out the tests marked slow (the longer end-to-end runs: real kills and
# signals, torchrun, S3, benchmark smokes) to stay within about 5 minutes; `make test-slow` runs those, and
# CI (.ci/run) runs both
test: setup data
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: setup data
	$(PY) -m pytest -q -n 2 -m slow

# the sdist and the wheel (what `pip install .` builds), into dist/; tests/test_package.py checks both
dist: setup
	$(PY) -m build --outdir dist .

clean:
	rm -rf runs bench dist .pytest_cache
