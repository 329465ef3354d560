# Budget-matched leaderboard (docs/leaderboard.md): every method on one model, one
# evaluation, the same budgets. LEADERBOARD_RUNS: the sweep folder (finished runs are
# skipped, so re-running resumes); LEADERBOARD_ARGS: overrides for every run (after --).
LEADERBOARD_RUNS ?= outputs/leaderboard_runs/main
LEADERBOARD_QUICK_RUNS ?= outputs/leaderboard_runs/quick
LEADERBOARD_ARGS ?=
.PHONY: leaderboard leaderboard-quick

leaderboard: install ## every method at 20-50% on llama_tiny and vit_tiny: quality, speed-up, cost, zero-shot (hours)
	nice -n 10 $(BIN)/python experiments/leaderboard/sweep.py --out $(LEADERBOARD_RUNS) -- $(LEADERBOARD_ARGS)
	$(BIN)/python experiments/leaderboard/table.py --runs $(LEADERBOARD_RUNS)

leaderboard-quick: install ## smoke leaderboard: small models, one budget, a few methods (minutes)
	nice -n 10 $(BIN)/python experiments/leaderboard/sweep.py --quick --out $(LEADERBOARD_QUICK_RUNS) -- $(LEADERBOARD_ARGS)
	$(BIN)/python experiments/leaderboard/table.py --quick --runs $(LEADERBOARD_QUICK_RUNS)
