# PELA (docs/pela.md): the grid experiments/pela/grid.yaml run by `python -m compresslab.grid`
# (finished runs are skipped, so re-running resumes). PELA_RUNS: the grid's folder;
# PELA_ARGS: grid options, e.g. PELA_ARGS="--settings vit_tiny --ratios 0.5 --seeds 0,1".
PELA_RUNS ?= outputs/pela_runs/main
PELA_QUICK_RUNS ?= outputs/pela_runs/quick
PELA_ARGS ?=
PELA_GRID := experiments/pela/grid.yaml
.PHONY: table-pela table-pela-quick

table-pela: install ## PELA ablation: vit_tiny/digits r0.3-0.9 + llama_tiny/pycode r0.5, BASE_SEEDS base models
	nice -n 10 $(GRID) $(PELA_GRID) --out $(PELA_RUNS) --base-seeds $(BASE_SEEDS) $(PELA_ARGS)
	$(BIN)/python experiments/pela/table.py --runs $(PELA_RUNS)

table-pela-quick: BASE_SEEDS = 0
table-pela-quick: install ## PELA ablation smoke run: ratio 0.5, few steps, one base model (BASE_SEEDS=0)
	nice -n 10 $(GRID) $(PELA_GRID) --variant quick --out $(PELA_QUICK_RUNS) \
		--base-seeds $(BASE_SEEDS) $(PELA_ARGS)
	$(BIN)/python experiments/pela/table.py --runs $(PELA_QUICK_RUNS)
