# compresslab — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
# the paper tables: one generic runner over each paper's declarative grid
# (experiments/<paper>/grid.yaml); every cell over BASE_SEEDS base models
# (model.pretrain.seed) and CALIB_SEEDS calibration draws (docs/seeded_tables.md)
GRID := $(BIN)/python -m compresslab.grid
BASE_SEEDS ?= 0,1,2
CALIB_SEEDS ?= 0
# each paper folder adds its table/figure targets in experiments/<paper>/targets.mk
-include experiments/*/targets.mk
.PHONY: help install demo test test-slow lint format base-models dln-demo clean clean-all \
        compare wandb-sync dashboards

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-22s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv and install compresslab with its dev extras
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: install ## the main job: svd at ratio 0.4 on the embedded LLaMA (pycode), dense vs compressed table
	$(BIN)/python run.py method=svd model=llama method.ratio=0.4

# the fast suite's test files are spread over this many processes (pytest-xdist); whole
# files go to one process, so a file's shared fixtures (cached base models) are built once
TEST_WORKERS ?= 2
test: install ## the fast test suite, TEST_WORKERS=2 processes (under 10 minutes on 2 cores)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: install ## the long tests only (-m slow)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow --timeout=3600

lint: install ## ruff over the package, tests, entry point and experiments
	$(BIN)/ruff check src tests run.py experiments

format: install ## ruff's import sorting and fixes
	$(BIN)/ruff check --fix src tests run.py experiments

base-models: install ## pre-train and cache the embedded base models (llama, vit)
	$(BIN)/python run.py method=none model=llama logger=csv
	$(BIN)/python run.py method=none model=vit logger=csv

dln-demo: install ## deep linear network on matrix factorization (the paper's settings, 1e5 GD steps)
	$(BIN)/python run.py experiment=dln_factorization

RUNS ?= $(lastword $(sort $(wildcard outputs/multirun/*/*)))
BY   ?= method.name,method.ratio
compare: install ## offline table + PNG: make compare RUNS="<run or sweep folders>" BY=method.name,method.ratio
	$(BIN)/python -m compresslab.compare $(RUNS) --by $(BY)

WANDB_OFFLINE_RUNS = $(wildcard outputs/runs/*/*/wandb/offline-run-* outputs/multirun/*/*/*/wandb/offline-run-*)
wandb-sync: install ## upload every offline W&B run under outputs/ (after `wandb login`)
	$(if $(WANDB_OFFLINE_RUNS),$(BIN)/wandb sync $(WANDB_OFFLINE_RUNS),@echo "no offline W&B runs under outputs/")

dashboards: install ## save the paper tables' W&B workspaces (online): make dashboards WANDB_ENTITY=<entity>
	@test -n "$(WANDB_ENTITY)" || { echo "error: set WANDB_ENTITY=<your W&B user or team>"; exit 2; }
	$(BIN)/python -m compresslab.dashboards --entity $(WANDB_ENTITY) --project $(or $(WANDB_PROJECT),compresslab)

clean: ## remove run folders and caches of tools (keeps cached base models and tokens)
	rm -rf outputs/runs outputs/multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

clean-all: clean ## also remove outputs/ entirely and the virtual environment
	rm -rf outputs $(VENV)
