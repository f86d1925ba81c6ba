# One command each: `make run` brings tally up on a machine with PostgreSQL and RabbitMQ on
# localhost; `make test` runs the whole test suite against them. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install migrate run api test test-repeat test-faults lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

migrate: install
	$(BIN)/tally migrate

run: migrate
	$(BIN)/tally dev

api: migrate
	$(BIN)/tally api

test: install
	$(BIN)/python -m pytest

# The tests that touch timing-sensitive paths (consumers and their gauges, key-cache races,
# header timeouts, fair sharing, competing consumer processes), run REPEAT times more: a flaky
# test shows here before it blocks a submission at random.
REPEAT ?= 3
REPEAT_TESTS := tests/test_ops.py tests/test_keycache.py tests/test_http_limits.py tests/test_fairness.py \
	tests/test_consumer.py tests/test_consumer_processes.py tests/test_dlq_replay.py

test-repeat: install
	for i in $$(seq $(REPEAT)); do echo "repeat $$i/$(REPEAT)"; $(BIN)/python -m pytest -q -p no:cacheprovider $(REPEAT_TESTS) || exit 1; done

# The gates CI runs before the tests: lint, format, types (strict on service/core), and the
# import contracts (edges never import each other; the domain imports no edge library).
lint: install
	$(BIN)/ruff check service consumers tests bench
	$(BIN)/ruff format --check service consumers tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix service consumers tests bench
	$(BIN)/ruff format service consumers tests bench

# Fault tests stop and restart this machine's PostgreSQL and RabbitMQ (and restore them), and bring up
# and remove a streaming standby and a three-node RabbitMQ cluster beside them (deploy/local/).
test-faults: install
	$(BIN)/python -m pytest -m faults

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
