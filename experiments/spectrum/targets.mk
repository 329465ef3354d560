# SVD family vs learned spectrum (docs/spectrum.md): the grid experiments/spectrum/grid.yaml run
# by `python -m compresslab.grid` (finished runs are skipped, so re-running resumes).
# SPECTRUM_RUNS: the grid's folder; SPECTRUM_ARGS: grid options, then `--` and overrides for
# every run (e.g. SPECTRUM_ARGS="--rows none,svd_llm,spectrum -- model=llama model.path=/data/llama ...").
SPECTRUM_RUNS ?= outputs/spectrum_runs/main
SPECTRUM_QUICK_RUNS ?= outputs/spectrum_runs/quick
SPECTRUM_ARGS ?=
SPECTRUM_GRID := experiments/spectrum/grid.yaml
.PHONY: table-spectrum table-spectrum-quick

table-spectrum: install ## SVD/FWSVD/ASVD/SVD-LLM/spectrum ppl at ratio 0.2-0.8 (llama_tiny/pycode), BASE_SEEDS base models
	nice -n 10 $(GRID) $(SPECTRUM_GRID) --out $(SPECTRUM_RUNS) --base-seeds $(BASE_SEEDS) \
		--calib-seeds $(CALIB_SEEDS) $(SPECTRUM_ARGS)
	$(BIN)/python experiments/spectrum/table.py --runs $(SPECTRUM_RUNS)

table-spectrum-quick: BASE_SEEDS = 0
table-spectrum-quick: install ## the spectrum table's smoke run: ratios 0.4,0.8, few gate steps, one base model (BASE_SEEDS=0)
	nice -n 10 $(GRID) $(SPECTRUM_GRID) --variant quick --out $(SPECTRUM_QUICK_RUNS) \
		--base-seeds $(BASE_SEEDS) --calib-seeds $(CALIB_SEEDS) $(SPECTRUM_ARGS)
	$(BIN)/python experiments/spectrum/table.py --runs $(SPECTRUM_QUICK_RUNS)

# The same small llama_tiny (2 x 64, vocab 512) the val checks in docs/spectrum.md used.
SPECTRUM_SMALL_LLAMA := model.source.hidden_size=64 model.source.intermediate_size=176 \
	model.source.num_layers=2 model.pretrain.max_steps=1000 dataset.datamodule.max_files=30 \
	dataset.datamodule.vocab_size=512 dataset.datamodule.max_eval_blocks=64 \
	dataset.datamodule.block_size=64
.PHONY: spectrum-val-checks

spectrum-val-checks: install ## svd_llm calibration inputs and spectrum search_forward on val (small llama_tiny)
	nice -n 10 $(BIN)/python experiments/spectrum/val_checks.py \
		--out outputs/spectrum_val/$(shell date +%Y%m%d-%H%M%S) -- $(SPECTRUM_SMALL_LLAMA)
