# relaygate — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit e2e bench fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: start the server in quickstart mode (SQLite, self-signed TLS, capture delivery)
run: $(STAMP)
	$(BIN)/relaygate serve

## test: lint (ruff, mypy --strict) and the whole test suite
test: lint
	$(BIN)/pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

## bench: the submission benchmark (see docs/performance.md)
bench: $(STAMP)
	$(BIN)/python bench/run.py

fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_session.py --runs 200000

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
