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

# End-to-end modules run a second time with every server on PostgreSQL
# (a database of its own each; RELAYGATE_TEST_POSTGRES says where).
E2E_POSTGRES := accounts credentials clients scram refusals revocation large_messages bounces reload \
	login_races throttle proxy quotas limits http http_api webui webui_login metrics webhooks \
	retention
E2E_POSTGRES_FILES := $(foreach m,$(E2E_POSTGRES),tests/e2e/test_e2e_$(m).py)

PG_PASS_LOG := test-artifacts/postgres-pass.log
# Short: Unix socket paths made under it stay within 108 bytes.
PG_PASS_TMP := /tmp/relaygate-postgres-pass

## test: lint (ruff, mypy --strict), the whole test suite, and at the same time the e2e storage
## modules on PostgreSQL (mostly waiting on servers and sockets: two passes fit two cores;
## the PostgreSQL pass has its own temporary directory, and its output follows the first's)
test: lint
	@mkdir -p test-artifacts
	@RELAYGATE_E2E_STORAGE=postgresql $(BIN)/pytest -q -p no:cacheprovider \
		--basetemp=$(PG_PASS_TMP) -m "not sqlite_only" $(E2E_POSTGRES_FILES) \
		> $(PG_PASS_LOG) 2>&1 & pg=$$!; trap 'kill $$pg 2>/dev/null' INT TERM; \
	$(BIN)/pytest -q tests; first=$$?; \
	wait $$pg; second=$$?; \
	echo "--- the e2e storage modules on PostgreSQL ($(PG_PASS_LOG)):"; cat $(PG_PASS_LOG); \
	[ $$first -eq 0 ] && [ $$second -eq 0 ]

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
