# SoKA vs LoRA / PiSSA / LoKr (docs/soka.md). PEFT_RUNS: the sweep folder
# (finished rows are skipped, so re-running resumes); PEFT_ARGS: sweep.py options, e.g.
# PEFT_ARGS="--seeds 0 --rows lora_r4,soka_tau0.5".
PEFT_RUNS ?= outputs/peft_runs/main
PEFT_ARGS ?=
.PHONY: table-peft

table-peft: install ## SoKA vs LoRA/PiSSA/LoKr: llama_tiny (pycode base) on 1-step arithmetic, 3 seeds (~40-75 min)
	nice -n 10 $(BIN)/python experiments/peft/sweep.py --out $(PEFT_RUNS) $(PEFT_ARGS)
	$(BIN)/python experiments/peft/table.py --runs $(PEFT_RUNS)

PEFT_SMALL_RUNS ?= outputs/peft_runs/small
# (150 steps and 100 test problems instead of the experiment's 300 and 400: ~30 minutes)
PEFT_SMALL := threads=1 model.source.hidden_size=64 model.source.intermediate_size=176 \
	model.source.num_layers=2 model.pretrain.max_steps=300 pretrain_data.datamodule.max_files=300 \
	pretrain_data.datamodule.vocab_size=1024 pretrain_data.datamodule.block_size=64 \
	method.stages.finetune.max_steps=150 dataset.datamodule.num_test=100
.PHONY: table-peft-small
table-peft-small: install ## the PEFT table on a 2x64 llama_tiny (CPU-sized, ~30 min on 2 cores)
	nice -n 10 $(BIN)/python experiments/peft/sweep.py --out $(PEFT_SMALL_RUNS) $(PEFT_ARGS) \
		-- $(PEFT_SMALL)
	$(BIN)/python experiments/peft/table.py --runs $(PEFT_SMALL_RUNS)
