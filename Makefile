# The two commands at the top of README.md:
#   make drill   set everything up and run the RB-09 drill on the embedded defaults
#   make test    set everything up and run lint, types and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: drill test lint typecheck pytest services clean bench mutate soak

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
	$(BIN)/python -m pytest -n 2

test: lint typecheck pytest

bench: $(STAMP) services
	$(BIN)/python -m benchmarks

# Mutation testing of the decision modules (docs/testing.md); not part of `make test` or CI.
# make mutate                          every module of scripts/mutation_modules.toml (~30-60 min)
# make mutate MODULE=outbox/_policy    one module (or a comma-separated list)
MUTATE_STAMP := $(VENV)/.mutate-installed
MUTATE_JOBS ?= 2
$(MUTATE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,mutate]"
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	$(BIN)/python scripts/mutate.py --max-children $(MUTATE_JOBS) $(if $(MODULE),--module "$(MODULE)")

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The fault soak (docs/performance.md, "Fault soak"): a private PostgreSQL and Redis, 4 worker
# processes, faults at random; not part of `make test`. Smaller: make soak SOAK_ARGS="--messages 10000 --events 10000"
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)
