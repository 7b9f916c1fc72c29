# Two entry points (see README): `make run` and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch: the +cpu wheel from PyTorch's CPU index (or a local wheel directory that
# pip is configured to look in); plain PyPI would give the CUDA build, several GB.
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin

.PHONY: setup redis run serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" --extra-index-url "$(TORCH_INDEX)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Only the tests need a Redis server (they start their own from this binary); `run` needs none.
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

run: setup
	$(BIN)/python -m trainer.main_job

serve: setup
	$(BIN)/birdie-server serve

test: setup redis
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/objectives.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
