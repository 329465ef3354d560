# SoKA vs LoRA / PiSSA / LoKr (docs/soka.md): the grid experiments/peft/grid.yaml run by
# `python -m compresslab.grid` (finished runs are skipped, so re-running resumes).
# PEFT_RUNS: the grid's folder; PEFT_ARGS: grid options, e.g.
# PEFT_ARGS="--seeds 0 --rows lora_r4,soka_tau0.5".
PEFT_RUNS ?= outputs/peft_runs/main
PEFT_SMALL_RUNS ?= outputs/peft_runs/small
PEFT_ARGS ?=
PEFT_GRID := experiments/peft/grid.yaml
.PHONY: table-peft table-peft-small

table-peft: install ## SoKA vs LoRA/PiSSA/LoKr: llama_tiny (pycode base) on 1-step arithmetic, 3 seeds (~35 min on 2 cores, longer under load)
	nice -n 10 $(GRID) $(PEFT_GRID) --out $(PEFT_RUNS) $(PEFT_ARGS)
	$(BIN)/python experiments/peft/table.py --runs $(PEFT_RUNS)

# (150 steps and 100 test problems instead of the experiment's 300 and 400: ~6 minutes;
# too small a model to learn the task, so it checks that the comparison runs, not its result)
table-peft-small: install ## the PEFT table on a 2x64 llama_tiny: an end-to-end check (~6 min on 2 cores)
	nice -n 10 $(GRID) $(PEFT_GRID) --variant small --out $(PEFT_SMALL_RUNS) $(PEFT_ARGS)
	$(BIN)/python experiments/peft/table.py --runs $(PEFT_SMALL_RUNS)
