# The two entry points of the README. Both set up .venv from the project's own files first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: dev test setup setup-test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -e .

setup-test: $(BIN)/python
	$(BIN)/pip install -e '.[test]'

# Embedded platform: moto S3 on 127.0.0.1, Dagster UI on http://127.0.0.1:3000, local catalog.
dev: setup
	$(BIN)/publish-platform dev

lint: setup-test
	$(BIN)/ruff check publish_platform publish_platform_tests
	$(BIN)/ruff format --check publish_platform publish_platform_tests

# Lint, then the whole suite (slow end-to-end tests included).
test: setup-test lint
	$(BIN)/pytest
