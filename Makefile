# Two entry points (see README): `make run` and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (this pin resolves to the CPU wheel on the project's machines).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

run: setup
	$(BIN)/python -m trainer.main_job

serve: setup
	$(BIN)/birdie-server serve

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/objectives.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
