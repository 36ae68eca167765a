# Two commands for a new user: `make demo` (set up, then run rotator against a local IAM server
# and a local Vault) and `make test` (the whole test suite). `make lint` runs the static checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint check clean

$(BIN)/rotator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/rotator
	$(BIN)/python scripts/demo.py

test: $(BIN)/rotator
	$(BIN)/pytest

lint: $(BIN)/rotator
	$(BIN)/ruff check rotator tests scripts
	$(BIN)/ruff format --check rotator tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint test

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis
