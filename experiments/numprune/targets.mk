# Numerical pruning (docs/numerical_pruning.md).
# NUMPRUNE_RUNS: the sweep folder (finished runs are skipped, so re-running resumes);
# NUMPRUNE_ARGS: sweep.py options, e.g. NUMPRUNE_ARGS="--models ar_image --ratios 0.2,0.3".
NUMPRUNE_RUNS ?= outputs/numprune_runs/main
NUMPRUNE_ARGS ?=
NUMPRUNE_SMALL_LLAMA := model.source.hidden_size=64 model.source.num_layers=2 \
	model.source.intermediate_size=176 model.pretrain.max_steps=300 \
	dataset.datamodule.max_files=300 dataset.datamodule.vocab_size=1024 \
	dataset.datamodule.block_size=64
.PHONY: table-numprune table-numprune-small

table-numprune: install ## numerical vs magnitude/wanda/flap: llama_tiny ppl, ar_image bpp, 10-50%
	nice -n 10 $(BIN)/python experiments/numprune/sweep.py --out $(NUMPRUNE_RUNS) $(NUMPRUNE_ARGS)
	$(BIN)/python experiments/numprune/table.py --runs $(NUMPRUNE_RUNS)

table-numprune-small: install ## the same table with a 2x64 llama_tiny (vocab 1024) beside ar_image
	nice -n 10 $(BIN)/python experiments/numprune/sweep.py --out $(NUMPRUNE_RUNS) \
		--models ar_image $(NUMPRUNE_ARGS)
	nice -n 10 $(BIN)/python experiments/numprune/sweep.py --out $(NUMPRUNE_RUNS) \
		--models llama_tiny --tag small $(NUMPRUNE_ARGS) -- $(NUMPRUNE_SMALL_LLAMA)
	$(BIN)/python experiments/numprune/table.py --runs $(NUMPRUNE_RUNS)
