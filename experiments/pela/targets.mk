# PELA (docs/pela.md). PELA_RUNS: the sweep folder; PELA_ARGS: sweep.py options.
ifndef PELA_RUNS
PELA_RUNS := outputs/pela_runs/$(shell date +%Y%m%d-%H%M%S)
endif
PELA_ARGS ?=
.PHONY: table-pela table-pela-quick

table-pela: install ## PELA ablation: vit_tiny/digits r0.3-0.9 x 3 seeds + llama_tiny/pycode r0.5
	nice -n 10 $(BIN)/python experiments/pela/sweep.py --out $(PELA_RUNS) $(PELA_ARGS)
	$(BIN)/python experiments/pela/table.py --runs $(PELA_RUNS)

table-pela-quick: install ## PELA ablation smoke run: 1 seed, ratio 0.5, few steps
	nice -n 10 $(BIN)/python experiments/pela/sweep.py --out $(PELA_RUNS) --seeds 0 \
		--ratios 0.5 -- method.stages.pretrain.max_steps=20 method.stages.finetune.max_steps=10
	$(BIN)/python experiments/pela/table.py --runs $(PELA_RUNS)
