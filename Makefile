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
# (a database of its own each; RELAYGATE_TEST_POSTGRES says where). Not here: modules
# whose subject keeps nothing in storage (ldap: the directory; verify: DNS and remote MX).
E2E_POSTGRES := accounts credentials clients scram oauth refusals revocation large_messages bounces reload \
	login_races throttle proxy quotas limits http http_api webui webui_login metrics webhooks \
	retention defence
E2E_POSTGRES_FILES := $(foreach m,$(E2E_POSTGRES),tests/e2e/test_e2e_$(m).py)

# The suite runs in three streams at once (the e2e tests mostly wait on servers and
# sockets; two streams left a third of the two cores idle). The first: tests/ but the
# third stream's modules. The second: the e2e storage modules on PostgreSQL. The third:
# these SQLite e2e modules, none of which uses Redis (the first stream's cluster, shared
# and contract tests flush its db). Each stream prints its slowest tests, to rebalance by.
THIRD_STREAM := delivery delivery_hostile delivery_mx postgres lifecycle defence \
	check check_postfix oauth ldap verify reload webui webhooks retention
THIRD_STREAM_FILES := $(foreach m,$(THIRD_STREAM),tests/e2e/test_e2e_$(m).py)
SECOND_LOG := test-artifacts/second-stream.log
THIRD_LOG := test-artifacts/third-stream.log
# Short: Unix socket paths made under them stay within 108 bytes.
SECOND_TMP := /tmp/relaygate-second-stream
THIRD_TMP := /tmp/relaygate-third-stream

## test: lint (ruff, mypy --strict), then the whole suite in three streams at once: tests/
## but THIRD_STREAM; the e2e storage modules on PostgreSQL; THIRD_STREAM. The second's and
## third's output (also in test-artifacts/) is printed after the first's.
test: lint
	@mkdir -p test-artifacts
	@RELAYGATE_E2E_STORAGE=postgresql $(BIN)/pytest -q -p no:cacheprovider --durations=5 \
		--basetemp=$(SECOND_TMP) -m "not sqlite_only" $(E2E_POSTGRES_FILES) \
		> $(SECOND_LOG) 2>&1 & second=$$!; \
	$(BIN)/pytest -q -p no:cacheprovider --durations=5 --basetemp=$(THIRD_TMP) \
		$(THIRD_STREAM_FILES) > $(THIRD_LOG) 2>&1 & third=$$!; \
	trap 'kill $$second $$third 2>/dev/null' INT TERM; \
	$(BIN)/pytest -q --durations=10 tests $(foreach f,$(THIRD_STREAM_FILES),--ignore=$(f)); first=$$?; \
	wait $$second; second=$$?; wait $$third; third=$$?; \
	echo "--- the e2e storage modules on PostgreSQL ($(SECOND_LOG)):"; \
	cat $(SECOND_LOG); \
	echo "--- $(THIRD_STREAM) ($(THIRD_LOG)):"; \
	cat $(THIRD_LOG); \
	[ $$first -eq 0 ] && [ $$second -eq 0 ] && [ $$third -eq 0 ]

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
