# Width-reduced deep linear networks (docs/dln.md)
.PHONY: fig-dln

fig-dln: install ## DLN paper: problem curves, alpha/depth ablations, incremental learning -> outputs/tables/dln*
	nice -n 10 $(BIN)/python experiments/dln/figures.py --runs outputs/dln_runs --out outputs/tables
