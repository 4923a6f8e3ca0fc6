# The two commands of the README's Quick start:
#   make demo   sets up .venv and runs the main job (the offline MTKD demo)
#   make test   sets up .venv and runs the linter and the whole test suite (then the
#               multi-process test, tests/test_multiprocess.py)
# Both work on a fresh Linux machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-multiprocess lint format setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install only when the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,torch,export]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m mtkd_jax.main $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15 $(ARGS)
	$(MAKE) test-multiprocess

# Two processes x 2 CPU devices against one process x 4, end to end, and a resume after killing
# both (tests/test_multiprocess.py): 8.5 CPU-minutes (18 min wall on a 2-core machine shared
# with other work), too much for the default pytest run, so its own step here.
test-multiprocess: setup
	$(BIN)/python -m pytest -m slow --durations=5 tests/test_multiprocess.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
