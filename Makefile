# The two entry points of the README. Both set up .venv from the project's own files first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: dev test setup setup-test setup-browser lint

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

# Debian's Chromium for the status page's browser test (root installs it; others need it already).
setup-browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "chromium is missing: apt-get install chromium (as root)"; exit 1; }

lint: setup-test
	$(BIN)/ruff check publish_platform publish_platform_tests
	$(BIN)/ruff format --check publish_platform publish_platform_tests

# Lint, then the whole suite (slow end-to-end tests included), on two workers.
test: setup-test setup-browser lint
	$(BIN)/pytest -n 2 --dist worksteal
