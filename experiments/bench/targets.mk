# Speed, memory and compression cost of compressed vs dense models (docs/bench.md).
# BENCH_ARGS: bench.py options, e.g. BENCH_ARGS="--threads 2 --repeats 7" or
# BENCH_ARGS="--models llama_1024x8 --only speed". Results: outputs/bench/bench.json,
# table: outputs/tables/bench.md (+ bench.png); bench-big adds its rows to both.
BENCH_ARGS ?=
.PHONY: bench bench-quick bench-big

bench: install ## speed, memory, FLOP limit and compression cost: low-rank/pruned/merged vs dense
	$(BIN)/python experiments/bench/bench.py $(BENCH_ARGS)

bench-quick: install ## a few minutes: llama_tiny cost vs floor, DLN ms/step and speed-ups, threads
	$(BIN)/python experiments/bench/bench.py --models llama_tiny --only cost,dln,threads \
		--out outputs/bench-quick --tables outputs/tables/bench-quick $(BENCH_ARGS)

bench-big: install ## ~1.1B-param LLaMA: peak RSS of svd_llm calibration + decomposition (slow)
	$(BIN)/python experiments/bench/bench.py --only big $(BENCH_ARGS)
