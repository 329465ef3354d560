# Numerical pruning (docs/numerical_pruning.md): the grid experiments/numprune/grid.yaml run by
# `python -m compresslab.grid` (finished runs are skipped, so re-running resumes).
# NUMPRUNE_RUNS: the grid's folder; NUMPRUNE_ARGS: grid options, e.g.
# NUMPRUNE_ARGS="--settings llama_tiny --ratios 0.3,0.5 --rows numerical_global,wanda -- threads=2".
# BASE_SEEDS / CALIB_SEEDS (Makefile): base models and calibration draws of every cell.
NUMPRUNE_RUNS ?= outputs/numprune_runs/main
NUMPRUNE_QUICK_RUNS ?= outputs/numprune_runs/quick
NUMPRUNE_SMALL_RUNS ?= outputs/numprune_runs/small
NUMPRUNE_DIAGNOSE_RUNS ?= $(NUMPRUNE_RUNS)
NUMPRUNE_ARGS ?=
NUMPRUNE_DIAGNOSE_ARGS ?=
NUMPRUNE_GRID := experiments/numprune/grid.yaml
.PHONY: table-numprune table-numprune-quick table-numprune-small numprune-diagnose

table-numprune: install ## numerical vs magnitude/wanda/flap: llama_tiny ppl, ar_image bpp, 10-50%, BASE_SEEDS base models
	nice -n 10 $(GRID) $(NUMPRUNE_GRID) --out $(NUMPRUNE_RUNS) --base-seeds $(BASE_SEEDS) \
		--calib-seeds $(CALIB_SEEDS) $(NUMPRUNE_ARGS)
	$(BIN)/python experiments/numprune/table.py --runs $(NUMPRUNE_RUNS)

table-numprune-quick: BASE_SEEDS = 0
table-numprune-quick: install ## the numprune table on one base model (BASE_SEEDS=0), 30 and 50% only
	nice -n 10 $(GRID) $(NUMPRUNE_GRID) --variant quick --out $(NUMPRUNE_QUICK_RUNS) \
		--base-seeds $(BASE_SEEDS) --calib-seeds $(CALIB_SEEDS) $(NUMPRUNE_ARGS)
	$(BIN)/python experiments/numprune/table.py --runs $(NUMPRUNE_QUICK_RUNS)

table-numprune-small: install ## the numprune table with a 2x64 llama_tiny (vocab 1024) beside ar_image
	nice -n 10 $(GRID) $(NUMPRUNE_GRID) --variant small --out $(NUMPRUNE_SMALL_RUNS) \
		--base-seeds $(BASE_SEEDS) --calib-seeds $(CALIB_SEEDS) $(NUMPRUNE_ARGS)
	$(BIN)/python experiments/numprune/table.py --runs $(NUMPRUNE_SMALL_RUNS)

numprune-diagnose: install ## why numerical falls behind at 30-50%: structures, conditioning, lambda, allocation (val only)
	nice -n 10 $(BIN)/python experiments/numprune/diagnose.py --runs $(NUMPRUNE_DIAGNOSE_RUNS) \
		--base-seeds $(BASE_SEEDS) $(NUMPRUNE_DIAGNOSE_ARGS)
