# meterline — the two commands a newcomer needs:
#   make run    set up .venv and run the pipeline on embedded defaults with demo traffic
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint setup browser bench verify clean

# Debian's chromium for the console's browser tests (Playwright drives it; no browser download).
browser:
	test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: browser $(STAMP)

run: $(STAMP)
	$(BIN)/meterline up --demo

# Lint, format and types run first: ruff over the tree, mypy strict over the pure core and contracts.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy meterline/core schemas

# Two pytest processes (xdist): most of the suite waits on brokers, workers and subprocesses, so
# two at a time finish in about half the time on 2 cores. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: browser $(STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=25 $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	LITELLM_LOCAL_MODEL_COST_MAP=True $(BIN)/python -m bench $(BENCH_ARGS)

verify: $(STAMP)
	$(BIN)/meterline verify

clean:
	rm -rf $(VENV) .meterline .pytest_cache
