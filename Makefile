# Herald: every command a developer or CI needs. `make run` and `make test` do all
# set-up themselves on a fresh machine (Python venv, Kafka broker from Maven Central).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run worker demo test lint typecheck schemas unit integration broker-start broker-stop broker-status topics fbs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

broker-start:
	scripts/kafka-local start

broker-stop:
	scripts/kafka-local stop

broker-status:
	scripts/kafka-local status

topics: install broker-start
	$(BIN)/herald topics apply

## Run the pipeline locally: broker, topics, a worker, and a demo intent end to end.
run: install broker-start topics
	scripts/run-local

## The whole test suite: lint, strict typing, unit, integration and end-to-end tests
## against the real broker.
test: install broker-start lint typecheck schemas
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check pipeline tests

typecheck: install
	$(BIN)/mypy

## The contracts' compatibility gate (docs/contracts.md).
schemas: install
	$(BIN)/herald schemas check

unit: install
	$(BIN)/pytest tests/unit

## Regenerate the Python FlatBuffers bindings from schemas/notification.fbs with the
## pinned flatc; commit the result (a unit test fails while they are out of date).
fbs: install
	scripts/gen-fbs

clean:
	scripts/kafka-local stop || true
	rm -rf $(VENV) .state
