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

# The second stream also takes these slow SQLite modules (none uses Redis, which
# the first stream's cluster and contract tests flush), so both end about together.
SECOND_STREAM := delivery delivery_hostile delivery_mx postgres lifecycle defence
SECOND_STREAM_FILES := $(foreach m,$(SECOND_STREAM),tests/e2e/test_e2e_$(m).py)
SECOND_LOG := test-artifacts/second-stream.log
# Short: Unix socket paths made under it stay within 108 bytes.
SECOND_TMP := /tmp/relaygate-second-stream

## test: lint (ruff, mypy --strict), then the whole test suite in two streams at once (the
## e2e tests mostly wait on servers and sockets, so two fit two cores): the first runs tests/
## but SECOND_STREAM; the second runs the e2e storage modules on PostgreSQL, then SECOND_STREAM.
## The second's output (also in test-artifacts/second-stream.log) is printed after the first's.
test: lint
	@mkdir -p test-artifacts
	@( RELAYGATE_E2E_STORAGE=postgresql $(BIN)/pytest -q -p no:cacheprovider --durations=5 \
		--basetemp=$(SECOND_TMP) -m "not sqlite_only" $(E2E_POSTGRES_FILES); pg=$$?; \
	  $(BIN)/pytest -q -p no:cacheprovider --durations=5 --basetemp=$(SECOND_TMP) \
		$(SECOND_STREAM_FILES); \
	  slow=$$?; [ $$pg -eq 0 ] && [ $$slow -eq 0 ] ) > $(SECOND_LOG) 2>&1 & second=$$!; \
	trap 'kill $$second 2>/dev/null' INT TERM; \
	$(BIN)/pytest -q --durations=10 tests $(foreach f,$(SECOND_STREAM_FILES),--ignore=$(f)); first=$$?; \
	wait $$second; second=$$?; \
	echo "--- the e2e storage modules on PostgreSQL, then $(SECOND_STREAM) ($(SECOND_LOG)):"; \
	cat $(SECOND_LOG); \
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
