# Set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# the index torch comes from: empty = pip's configured one (here a local CPU wheel); from PyPI
# on Linux that is the CUDA build, so there use TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bbb demo --out runs/demo

# The sweep extra (optuna, a PostgreSQL driver) so that the `bbb sweep` tests run, not skip.
SWEEP_STAMP := $(VENV)/.sweep-installed
$(SWEEP_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,sweep]'
	touch $(SWEEP_STAMP)

# The tests run in parallel, one pytest-xdist worker per CPU core (tests/conftest.py gives each
# worker one torch thread); TEST_WORKERS=0 runs them one at a time in this process.
TEST_WORKERS ?= auto

test: $(STAMP) $(SWEEP_STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS)

test-all: $(STAMP) $(SWEEP_STAMP)
	$(PY) -m pytest -q

# Issue 8: install the peer libraries (--no-deps: no torchvision / CUDA torch) and run the
# training-step benchmark; results in runs/bench/step_time.json (takes ~10-20 minutes).
BENCH_PEERS := bayesian-torch blitz-bayesian-pytorch torchbnn pyro-ppl pyro-api opt_einsum
bench: $(STAMP)
	$(PIP) install -q --no-deps $(BENCH_PEERS)
	$(PY) benchmarks/step_time.py --json runs/bench/step_time.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
