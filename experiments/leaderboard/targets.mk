# Budget-matched leaderboard (docs/leaderboard.md): every method on one model, one
# evaluation, the same budgets; the grid experiments/leaderboard/grid.yaml run by
# `python -m compresslab.grid`. LEADERBOARD_RUNS: the grid's folder (finished runs are
# skipped, so re-running resumes); LEADERBOARD_ARGS: grid options, then `--` and overrides
# for every run. A run that fails is reported and the table still shows the others ("-" make
# lines: the table is written even then).
LEADERBOARD_RUNS ?= outputs/leaderboard_runs/main
LEADERBOARD_QUICK_RUNS ?= outputs/leaderboard_runs/quick
LEADERBOARD_ARGS ?=
LEADERBOARD_GRID := experiments/leaderboard/grid.yaml
.PHONY: leaderboard leaderboard-quick

leaderboard: install ## every method at 20-50% on llama_tiny and vit_tiny: quality, speed-up, cost, zero-shot (hours)
	-nice -n 10 $(GRID) $(LEADERBOARD_GRID) --out $(LEADERBOARD_RUNS) $(LEADERBOARD_ARGS)
	$(BIN)/python experiments/leaderboard/table.py --runs $(LEADERBOARD_RUNS)

leaderboard-quick: install ## smoke leaderboard: small models, one budget, a few methods (minutes)
	-nice -n 10 $(GRID) $(LEADERBOARD_GRID) --variant quick --out $(LEADERBOARD_QUICK_RUNS) $(LEADERBOARD_ARGS)
	$(BIN)/python experiments/leaderboard/table.py --quick --runs $(LEADERBOARD_QUICK_RUNS)
