# The two commands at the top of README.md:
#   make drill   set everything up and run the RB-09 drill on the embedded defaults
#   make test    set everything up and run lint, types and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: drill test lint typecheck pytest services clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

drill: $(STAMP)
	$(BIN)/idis-integrations drill

services:
	bash scripts/services.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples migrations
	$(BIN)/ruff format --check src tests benchmarks examples migrations

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy examples/integrations_service

pytest: $(STAMP) services
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: $(STAMP) services
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
