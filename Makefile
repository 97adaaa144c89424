# Two commands: `make demo` (headline experiment) and `make test` (lint, types, the tests).
# Both create a local virtual environment in .venv: `make demo` (and every target that runs
# masq) installs the core (what run, grid, table and report need), `make test` and
# `make format` add the extra `dev` (test tools, lint, Ray and TensorBoard for their tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.masq-installed
DEV_STAMP := $(VENV)/.masq-dev-installed
HOW_TO_CALL := masq is installed into $(VENV): call $(BIN)/masq (e.g. $(BIN)/masq --help), \
  or first 'source $(BIN)/activate', then masq
# CPU build of PyTorch, installed only where the venv has no torch yet (GPU users: install
# your torch into the venv first, or `pip install -e .` into an environment that has one).
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test docs format bench repro analyses report imm table1 kfac peers peers-tables clean

install: $(STAMP)
	@echo "$(HOW_TO_CALL)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet --timeout 10 --retries 1 \
	    --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/masq data fetch
	$(BIN)/masq compare --slt D5-5 --csv --out results/demo
	@echo "results/demo is a results directory: $(BIN)/masq table --results results/demo," \
	  "$(BIN)/masq report --results results/demo --out report"
	@echo "$(HOW_TO_CALL)"

test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(DOCS_CHECK)
	$(BIN)/pytest

# The documentation site (mkdocs.yml, docs/): `make docs` builds it into site/ (open
# site/index.html); `make test` builds it with --strict into a scratch directory.
DOCS_CHECK ?= .site-check
DOCS_STAMP := $(VENV)/.masq-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "the site is in site/: open site/index.html"

# The first reproduction (docs/results/first-reproduction.md): per SLT its paper-best architecture and eps2, both
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

# The paper's analyses (docs/results/analyses.md): Table 2 for all six tensors of 784-30-30-10
# (~14 min), FIM versus MaSQ at each SLT's task-1 state (the winners of $(REPRO) or $(IMM) when
# one exists, else freshly trained paper-best nets), and the λ sweeps of the three SLTs at
# their paper-best nets (228 runs, bf16; `masq analyze lambda --dry-run` prints the estimate).
# The sweep resumes from the committed records ($(LAMBDA_RECORDS)) and exports them back.
ANALYSES ?= docs/analysis
LAMBDA ?= results/lambda
LAMBDA_RECORDS ?= $(ANALYSES)/lambda_records.jsonl.gz
COMPARE_FROM = $(if $(wildcard $(REPRO)/meta.json),--results $(REPRO),$(if \
  $(wildcard $(IMM)/meta.json),--results $(IMM),--slt D5-5 D9-1 DP10-10))
analyses: $(STAMP)
	$(BIN)/masq analyze diagonality --out $(ANALYSES)
	$(BIN)/masq analyze compare $(COMPARE_FROM) --out $(ANALYSES)
	if [ -f $(LAMBDA_RECORDS) ]; then \
	  $(BIN)/masq import --from $(LAMBDA_RECORDS) --results $(LAMBDA) || exit 1; \
	fi
	$(BIN)/masq analyze lambda --slt D5-5 D9-1 DP10-10 --precision bf16 --results $(LAMBDA) \
	  --out $(ANALYSES); rc=$$?; \
	  $(BIN)/masq export --results $(LAMBDA) --to $(LAMBDA_RECORDS) && exit $$rc

# Does the Fisher's off-diagonal part matter? (docs/results/diagonality.md): EWC with the diagonal FIM,
# K-FAC, the per-layer Fisher blocks and MaSQ on 784-30-30-10, 5 seeds, λ from 1 to 1e12 per
# decade, λ chosen on validation; a resumable grid that starts from the committed records.
# RUN_FLAGS: flags for the runs of `make kfac` and `make peers`, e.g. RUN_FLAGS='--device cuda'.
RUN_FLAGS ?=
KFAC ?= results/kfac
KFAC_RECORDS := docs/kfac/records.jsonl.gz
KFAC_RUN = $(BIN)/masq analyze kfac --seeds 5 --fisher-samples 500 --hidden 30-30 --results $(KFAC) \
  $(RUN_FLAGS)
# the paper's best architectures per SLT: the diagonal, K-FAC and MaSQ (not the blocks: their
# penalty costs samples x classes x the layer's weights per layer and step); λ up to 1e17,
# because on D5-5 (784-800-800-10) the diagonal FIM and MaSQ mean both chose 1e12, the top
# of the first sweep, and MaSQ mean then 1e15, the top of the second; each λ swept on seed 0
# and chosen on its validation sets, seeds 1-4 at that λ (a K-FAC run takes 7-12 min here)
KFAC_PAPER = $(BIN)/masq analyze kfac --seeds 5 --fisher-samples 500 --results $(KFAC) \
  --measures 'diagonal FIM' K-FAC 'MaSQ (mean)' --lam-max 1e17 --tune-seeds 1 $(RUN_FLAGS)
kfac: $(STAMP)
	if [ -f $(KFAC_RECORDS) ]; then \
	  $(BIN)/masq import --from $(KFAC_RECORDS) --results $(KFAC) || exit 1; \
	fi
	$(KFAC_RUN) --slt D5-5 D9-1 DP10-10 --out docs/kfac/paper-slts && \
	  $(KFAC_RUN) --slt D2-2-2-2-2 --scenario task --lr2 1e-3 --iters1 2000 --iters2 2000 \
	  --batch-size 128 --out docs/kfac/split && \
	  $(KFAC_PAPER) --out docs/kfac/paper-arch; rc=$$?; \
	  $(BIN)/masq export --results $(KFAC) --to $(KFAC_RECORDS) && exit $$rc

# The field's reference tables (masq peers --list): each preset's runs into $(PEERS), then each
# table beside its publication into docs/peers/<preset>/. Resumable: the committed records
# ($(PEERS_RECORDS)) are imported first and exported back at the end, also when a run failed.
# `make peers PRESETS=vdv2025-fisher` runs one table; on a GPU:
# `make peers PRESETS=vdv2019-permuted RUN_FLAGS='--device cuda'`.
PEERS ?= results/peers
PEERS_DOCS ?= docs/peers
PEERS_RECORDS := $(PEERS_DOCS)/records.jsonl.gz
PRESETS ?= vdv2025-fisher vdv2019-split vdv2019-permuted
peers: $(STAMP)
	if [ -f $(PEERS_RECORDS) ]; then \
	  $(BIN)/masq import --from $(PEERS_RECORDS) --results $(PEERS) || exit 1; \
	fi
	rc=0; for preset in $(PRESETS); do \
	  $(BIN)/masq grid --preset $$preset --results $(PEERS) $(RUN_FLAGS) || { rc=1; break; }; \
	done; \
	$(BIN)/masq export --results $(PEERS) --to $(PEERS_RECORDS) || exit 1; \
	for preset in $(PRESETS); do \
	  $(BIN)/masq peers $$preset --results $(PEERS) --out $(PEERS_DOCS)/$$preset || exit 1; \
	done; exit $$rc

# The tables alone, from the committed records (nothing is run): `make peers-tables` remakes
# every committed table (docs/peers/<preset>/peers.md) from the presets' runs as shipped,
# whatever grids with flags ran in $(PEERS); PEER_TABLES=NAME for another.
PEER_TABLES ?= $(patsubst $(PEERS_DOCS)/%/peers.md,%,$(wildcard $(PEERS_DOCS)/*/peers.md))
peers-tables: $(STAMP)
	$(BIN)/masq import --from $(PEERS_RECORDS) --results $(PEERS)
	for preset in $(PEER_TABLES); do \
	  $(BIN)/masq peers $$preset --results $(PEERS) --out $(PEERS_DOCS)/$$preset --shipped || exit 1; \
	done

# One browsable page (REPORT/index.html, report.md, PNGs) from whatever of the above exists.
REPORT ?= report
REPORT_FROM = $(wildcard $(REPRO)/meta.json $(LAMBDA)/meta.json $(IMM)/meta.json \
  $(TABLE1_DOCS)/table1_settled_test.md docs/kfac/paper-slts/kfac.json docs/kfac/split/kfac.json docs/kfac/paper-arch/kfac.json \
  $(wildcard $(PEERS_DOCS)/*/peers.json))
report: $(STAMP)
	$(BIN)/masq report --results $(dir $(REPORT_FROM)) $(ANALYSES) \
	  --bench docs/bench/importance_part1.txt --out $(REPORT)

# IMM with the FIM or MaSQ (the paper's future work): per SLT its paper-best architecture
# and eps2; EWC (lambda = 0 and c / eps2, c in 0.1 1 10), mean-IMM and mode-IMM with FIM and
# MaSQ mean/sum, drop-transfer (p = 0.5) and L2-transfer (lambda_T = 1e-3), Lee et al. 2017's
# MNIST settings; 3 seeds; tables (selected on val and test) and alpha figures into docs/imm/.
# Resumes from the committed records ($(IMM_RECORDS)) and exports them back.
IMM ?= results/imm
IMM_DOCS ?= docs/imm
IMM_SEEDS ?= 0 1 2
IMM_ITERS ?= 5000
IMM_SLTS ?= D5-5:800-800:1e-5 D9-1:800-400-400:1e-4 DP10-10:800-800-200:1e-5
IMM_RECORDS ?= $(IMM_DOCS)/records.jsonl.gz
IMM_AXES = --preset none --seed $(IMM_SEEDS) --iters1 $(IMM_ITERS) --iters2 $(IMM_ITERS) \
  --eval-val --importance masq fisher --scale mean sum --results $(IMM)
IMM_GROUPS := --group-by consolidation importance scale transfer
imm: $(STAMP)
	if [ -f $(IMM_RECORDS) ]; then \
	  $(BIN)/masq import --from $(IMM_RECORDS) --results $(IMM) || exit 1; \
	fi
	rc=0; for spec in $(IMM_SLTS); do \
	  slt=$${spec%%:*}; rest=$${spec#*:}; hidden=$${rest%%:*}; lr2=$${rest#*:}; \
	  $(BIN)/masq grid --slt $$slt --hidden $$hidden --lr2 $$lr2 $(IMM_AXES) \
	    --consolidation ewc --lam 0 --lam-per-lr2 0.1 1 10 || { rc=1; break; }; \
	  $(BIN)/masq grid --slt $$slt --hidden $$hidden --lr2 $$lr2 $(IMM_AXES) \
	    --consolidation mean-imm mode-imm --transfer drop l2 || { rc=1; break; }; \
	done; \
	$(BIN)/masq export --results $(IMM) --to $(IMM_RECORDS) && exit $$rc
	$(BIN)/masq table --results $(IMM) $(IMM_GROUPS) --select-on val --out $(IMM_DOCS)
	$(BIN)/masq table --results $(IMM) $(IMM_GROUPS) --select-on test --out $(IMM_DOCS)
	$(BIN)/masq imm-report --results $(IMM) --out $(IMM_DOCS)

# Table 1, settled (docs/results/table1.md): per SLT its paper-best architecture, eps2 in {1e-3, 1e-4, 1e-5,
# 1e-6} x lambda in {0, 0.1, 1, 10, ..., 1e10} (extended x10 while "last" still rises at the top)
# x FIM / MaSQ (mean) x init torch / tf on seed 0 (dense-early, validation curves, bf16); the
# winners selected on test and on validation re-run on seeds 1-4; settled tables, paired
# t-tests, inflation and figures into $(TABLE1_DOCS). Resumable: the committed records
# ($(TABLE1_RECORDS)) are imported first and exported back at the end, also when a run
# failed.
TABLE1 ?= results/table1
TABLE1_DOCS ?= docs/table1
TABLE1_RECORDS ?= $(TABLE1_DOCS)/records.jsonl.gz
table1: $(STAMP)
	if [ -f $(TABLE1_RECORDS) ]; then \
	  $(BIN)/masq import --from $(TABLE1_RECORDS) --results $(TABLE1) || exit 1; \
	fi
	$(BIN)/masq table1 --results $(TABLE1) --out $(TABLE1_DOCS); rc=$$?; \
	  $(BIN)/masq export --results $(TABLE1) --to $(TABLE1_RECORDS) && exit $$rc

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/importance.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache site .site-check
