# Two commands: `make demo` (headline experiment) and `make test` (lint + the whole test suite).
# Both create a local virtual environment in .venv and install everything into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.masq-installed
# CPU build of PyTorch, installed only where the venv has no torch yet (GPU users: install
# your torch into the venv first, or `pip install -e .` into an environment that has one).
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet --timeout 10 --retries 1 \
	    --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/masq data fetch
	$(BIN)/masq compare --slt D5-5 --out results/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/importance.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
