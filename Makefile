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

.PHONY: install demo test format bench repro clean

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

# The first reproduction (README): per SLT its paper-best architecture and eps2, both
# readings of lambda, MaSQ mean/sum and FIM, both inits; one seed, 90 runs (~58 min on 2 cores).
REPRO ?= results/repro
REPRO_AXES := --lam 0 100 1000 10000 --lam-per-lr2 0.1 1 10 --importance masq fisher \
  --scale mean sum --init torch tf --eval-val --results $(REPRO)
repro: $(STAMP)
	$(BIN)/masq grid --slt D5-5 --hidden 800-800 --lr2 1e-5 $(REPRO_AXES)
	$(BIN)/masq grid --slt D9-1 --hidden 800-400-400 --lr2 1e-4 $(REPRO_AXES)
	$(BIN)/masq grid --slt DP10-10 --hidden 800-800-200 --lr2 1e-5 $(REPRO_AXES)
	$(BIN)/masq table --results $(REPRO)
	$(BIN)/masq table --results $(REPRO) --group-by init importance scale
	$(BIN)/masq table --results $(REPRO) --select-on val
	$(BIN)/masq consistency --results $(REPRO)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/importance.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
