# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-fast test-kernels venv clean gpu

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tomec.demo

# The whole suite, in TEST_WORKERS processes (pytest-xdist; one thread each: the Inductor compiles
# that dominate the suite are single-threaded). Kernel tests run in their own processes under
# TRITON_INTERPRET=1 (the variable must be set before triton is imported).
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 tests --ignore=tests/kernels
	@if [ -d tests/kernels ]; then TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests/kernels; fi

# Everything but the Inductor compiles (seconds instead of minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/kernels -m "not slow"

# On a lent GPU machine (its own Python, torch and Triton; no venv, nothing installed): every GPU test
# and benchmark in one call, results and logs into $(OUT). See bench/gpu.py.
GPU_PYTHON ?= python3
OUT ?= bench/results/gpu
gpu:
	$(GPU_PYTHON) bench/gpu.py --out $(OUT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
