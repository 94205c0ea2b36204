# Two entry points for a fresh machine: `make run` (service on :3000, SQLite + memory) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test lint install bench mutants

# client/pyproject.toml: the consumer client is installed editable (-e ./client); a change to its
# metadata (version, dependencies, entry points) needs a reinstall.
$(BIN)/.installed: requirements.txt requirements-dev.txt client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed

# The Procfile's lines, run as a platform runs them: through a shell, with the venv on PATH.
procfile = PATH="$(abspath $(BIN)):$$PATH" bash -c '$(shell sed -n 's/^$(1): //p' Procfile)'

run: install
	$(call procfile,release)
	$(call procfile,web)

test: lint
	$(BIN)/pytest

# Style, then the package's layers and the absence of import circles (pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The benchmark suite (BENCHMARKS.md): `make bench`, or `make bench ARGS=--quick`.
bench: install
	$(BIN)/python -m bench $(ARGS)

# Mutation testing (docs/mutation.md), not in CI: `make mutants`, or `make mutants GROUPS="counters
# retention"`; MUTANTS_BACKENDS=sqlite runs the tests on SQLite alone (faster, less thorough).
mutants: install
	$(BIN)/python tools/mutants.py run $(GROUPS)
