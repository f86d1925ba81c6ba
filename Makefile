# One command each: `make run` brings tally up on a machine with PostgreSQL and RabbitMQ on
# localhost; `make test` runs the whole test suite against them; `make docs` builds the
# documentation site. Each installs what it needs into .venv first, exactly as uv.lock pins it:
# `make run` the runtime dependencies only, `make test` and `make lint` the dev extra as well,
# `make docs` the docs extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# uv installs from the lock file. It is itself pinned, and installed from PyPI into a venv of
# its own (.tools), so that a fresh clone needs nothing but Python.
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
# --locked: refuse a uv.lock that no longer matches pyproject.toml (`make lock` updates it).
# --inexact: keep what another target installed (make test after make docs keeps both extras).
SYNC := $(UV) sync --locked --inexact --python $(PYTHON)

.PHONY: install install-dev install-docs install-bench lock lock-check migrate run api test test-unit schema test-repeat test-faults lint format \
	docs docs-serve config-reference clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev
install-docs: $(VENV)/.docs
install-bench: $(VENV)/.bench

$(VENV)/.runtime: pyproject.toml uv.lock | $(UV)
	$(SYNC)
	touch $@

$(VENV)/.dev: pyproject.toml uv.lock | $(UV)
	$(SYNC) --extra dev
	touch $@

$(VENV)/.docs: pyproject.toml uv.lock | $(UV)
	$(SYNC) --extra docs
	touch $@

$(VENV)/.bench: pyproject.toml uv.lock | $(UV)
	$(SYNC) --extra bench
	touch $@

# Resolve pyproject.toml's dependencies again into uv.lock (add --upgrade to move to newer
# versions), and check that the lock matches pyproject.toml (CI runs the check).
lock: $(UV)
	$(UV) lock --python $(PYTHON)

lock-check: $(UV)
	$(UV) lock --check --python $(PYTHON)

migrate: install
	$(BIN)/tally migrate

run: migrate
	$(BIN)/tally dev

api: migrate
	$(BIN)/tally api

test: install-dev
	$(BIN)/python -m pytest

# The schema as the migrations leave it, written to service/store/schema.sql from a database
# migrated from scratch (tests/test_schema.py fails when it is stale).
schema: install-dev
	$(BIN)/python -m service.infra.schemadump

# The fast tier: every test that needs no database or broker (the pure domain, the SQL
# compiler's text, the limiters, the docs' consistency), with every connection to a service
# refused, so that a test needing one cannot pass here by accident.
test-unit: install-dev
	TALLY_TEST_OFFLINE=1 $(BIN)/python -m pytest -q -m "unit and not faults" -p no:cacheprovider

# The tests that touch timing-sensitive paths (consumers and their gauges, key-cache races,
# header timeouts, fair sharing, competing consumer processes), run REPEAT times more: a flaky
# test shows here before it blocks a submission at random.
REPEAT ?= 3
REPEAT_TESTS := tests/test_ops.py tests/test_keycache.py tests/test_http_limits.py tests/test_fairness.py \
	tests/test_consumer.py tests/test_consumer_processes.py tests/test_dlq_replay.py

test-repeat: install-dev
	for i in $$(seq $(REPEAT)); do echo "repeat $$i/$(REPEAT)"; $(BIN)/python -m pytest -q -p no:cacheprovider $(REPEAT_TESTS) || exit 1; done

# The gates CI runs before the tests: lint, format, types (strict on service/domain and service/store), and the
# import contracts (edges never import each other; the domain imports no edge library).
lint: install-dev
	$(BIN)/ruff check service consumers tests bench docs
	$(BIN)/ruff format --check service consumers tests bench docs
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install-dev
	$(BIN)/ruff check --fix service consumers tests bench docs
	$(BIN)/ruff format service consumers tests bench docs

# Fault tests stop and restart this machine's PostgreSQL and RabbitMQ (and restore them), and bring up
# and remove a streaming standby and a three-node RabbitMQ cluster beside them (deploy/local/).
test-faults: install-dev
	$(BIN)/python -m pytest -m faults

# The documentation site, from docs/ (mkdocs.yml), into site/: strict, so a broken link or a
# page missing from the navigation fails the build. The API reference page embeds the OpenAPI
# document, written at build time from the code (docs/hooks.py).
# (NO_MKDOCS_2_WARNING: the Material theme's banner about a future MkDocs 2, printed on every build.)
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: install-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# docs/configuration.md is generated from the settings' own descriptions
# (service/infra/settings.py); tests/test_docs_site.py fails when the two disagree.
config-reference: install
	$(BIN)/python -m service.infra.settingsdoc > docs/configuration.md

clean:
	rm -rf $(VENV) $(TOOLS) site .pytest_cache .hypothesis *.egg-info
