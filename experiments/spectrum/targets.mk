# SVD family vs learned spectrum (docs/spectrum.md).
# SPECTRUM_RUNS: the sweep folder; SPECTRUM_ARGS: sweep.py options, then `--` and overrides
# for every run (e.g. SPECTRUM_ARGS="-- model=llama model.path=/data/llama dataset=text_files ...").
ifndef SPECTRUM_RUNS
SPECTRUM_RUNS := outputs/spectrum_runs/$(shell date +%Y%m%d-%H%M%S)
endif
SPECTRUM_ARGS ?=
.PHONY: table-spectrum table-spectrum-quick

table-spectrum: install ## SVD/FWSVD/ASVD/SVD-LLM/spectrum ppl at ratio 0.2-0.8 (llama_tiny/pycode)
	nice -n 10 $(BIN)/python experiments/spectrum/sweep.py --out $(SPECTRUM_RUNS) $(SPECTRUM_ARGS)
	$(BIN)/python experiments/spectrum/table.py --runs $(SPECTRUM_RUNS)

table-spectrum-quick: install ## the spectrum table's smoke run: ratios 0.4,0.8, few gate steps
	nice -n 10 $(BIN)/python experiments/spectrum/sweep.py --out $(SPECTRUM_RUNS) \
		--ratios 0.4,0.8 --spectrum-steps 20 --finetune-steps 10
	$(BIN)/python experiments/spectrum/table.py --runs $(SPECTRUM_RUNS)

# The same small llama_tiny (2 x 64, vocab 512) the val checks in docs/spectrum.md used.
SPECTRUM_SMALL_LLAMA := model.source.hidden_size=64 model.source.intermediate_size=176 \
	model.source.num_layers=2 model.pretrain.max_steps=1000 dataset.datamodule.max_files=30 \
	dataset.datamodule.vocab_size=512 dataset.datamodule.max_eval_blocks=64 \
	dataset.datamodule.block_size=64
.PHONY: spectrum-val-checks

spectrum-val-checks: install ## svd_llm calibration inputs and spectrum search_forward on val (small llama_tiny)
	nice -n 10 $(BIN)/python experiments/spectrum/val_checks.py \
		--out outputs/spectrum_val/$(shell date +%Y%m%d-%H%M%S) -- $(SPECTRUM_SMALL_LLAMA)
