"""Measured speed, memory and compression cost of compressed models against their dense
originals and the FLOP limit (``make bench``; docs/bench.md).

    python experiments/bench/bench.py                 # speed + rank rounding + cost, table
    python experiments/bench/bench.py --big           # + the ~1B-parameter calibration memory
    python experiments/bench/bench.py --only big      # just that part (merged into the JSON)
    python experiments/bench/bench.py --table         # re-render the table from the JSON

Models are randomly initialised (speed and memory depend on shapes only; nothing is
trained or downloaded): ``llama_tiny`` and ``vit_tiny`` at the project's config sizes and a
LLaMA of hidden 1024 x 8 layers. Every compressed form is made by the project's own
stages: low-rank (``LowRankStage``, plain-SVD factors, one SVD per weight shared by all
ratios), structured pruning (``StructuredPruneStage``: magnitude scores, the same ratio in
every block, physically smaller linears), LoRA and SoKA adapters merged back
(``MergeAdaptersStage``: dense shapes). Dense and compressed models are timed in turns in
one process, medians over rounds, speed-ups as medians of per-round ratios, beside the
FLOP limit (dense FLOPs / compressed FLOPs). Compression cost (wall time and peak RSS of
calibration + decomposition) is measured in a fresh subprocess per measurement.

Writes ``<out>/bench.json`` and ``<tables>/bench.md`` + ``bench.png``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling parts (dln_bench)

from compresslab.metrics.speed import (  # noqa: E402
    TensorMemory,
    busy_machine_warning,
    count_flops,
    current_rss_bytes,
    median,
    paired_speedup,
    param_bytes,
    param_count,
    peak_rss_bytes,
    ratio,
)
from compresslab.metrics.speed import timed_in_turns as timed  # noqa: E402

LOWRANK_RATIOS = (0.2, 0.4, 0.5, 0.6)
PRUNE_RATIOS = (0.2, 0.3)
ROUNDING_RATIO = 0.5                      # the ratio at which round_to=1 and the candidate meet
ROUND_CANDIDATES = (8, 16, 32, 64)
COST_METHODS = ("svd", "svd_llm", "spectrum", "numerical_pruning")
GiB = 1024 ** 3


# -- models ------------------------------------------------------------------------------------

@dataclass
class BenchModel:
    """A randomly initialised model and its batch shapes."""

    name: str
    source: object                # a compresslab ModelSource
    spec: object                  # its DataSpec
    seq_len: int = 0              # text: tokens per sequence
    throughput_batch: int = 8
    prompt_len: int = 16          # generation: prompt tokens, then new_tokens greedy tokens
    new_tokens: int = 16

    @property
    def text(self) -> bool:
        return self.spec.modality == "text"

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.source.build(self.spec).eval()

    def batch(self, size: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.text:
            return torch.randint(0, self.spec.vocab_size, (size, self.seq_len), generator=g)
        s = self.spec
        return torch.randn(size, s.channels, s.image_size, s.image_size, generator=g)

    def tokens(self, size: int) -> int:
        """What a rate counts per forward pass of ``size`` samples: text tokens (batch x
        sequence, also the rows each linear sees) or images."""
        return size * self.seq_len if self.text else size

    def describe(self) -> dict:
        kw = dict(getattr(self.source, "kwargs", {}))
        return {"source": type(self.source).__name__, **kw,
                **{k: v for k, v in vars(self.spec).items() if v is not None},
                "seq_len": self.seq_len or None, "throughput_batch": self.throughput_batch}


def _config_source(model: str):
    """The model source ``model=<model>`` builds (composed with its defaults: the family
    config, no checkpoint path, i.e. the embedded model)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    return instantiate(cfg.model.source)


def bench_models() -> dict[str, BenchModel]:
    """The benchmarked sizes: the project's llama_tiny and vit_tiny configs (pycode vocab
    and block size; digits images) and a LLaMA of hidden 1024 x 8 layers."""
    from omegaconf import OmegaConf

    from compresslab.data.spec import DataSpec
    from compresslab.models.llama import TinyLlama

    pycode = OmegaConf.load(CONFIGS / "dataset" / "pycode.yaml").datamodule
    text = DataSpec("text", vocab_size=int(pycode.vocab_size))
    seq = int(pycode.block_size)
    return {
        "llama_tiny": BenchModel("llama_tiny", _config_source("llama_tiny"), text, seq, 8),
        "llama_1024x8": BenchModel(
            "llama_1024x8", TinyLlama(hidden_size=1024, num_layers=8, num_heads=16,
                                      intermediate_size=2816), text, seq, 4),
        "vit_tiny": BenchModel("vit_tiny", _config_source("vit_tiny"),
                               DataSpec("image", num_classes=10, image_size=8, channels=1),
                               throughput_batch=256),
    }


def big_model() -> BenchModel:
    """~1.1B parameters (TinyLlama-1.1B's shapes: 22 x 2048, GQA 32/4 heads, MLP 5632,
    vocab 32000, untied head), fp32."""
    from compresslab.data.spec import DataSpec
    from compresslab.models.llama import TinyLlama

    return BenchModel("llama_1b", TinyLlama(hidden_size=2048, num_layers=22, num_heads=32,
                                            num_kv_heads=4, intermediate_size=5632,
                                            max_position_embeddings=2048,
                                            tie_word_embeddings=False),
                      DataSpec("text", vocab_size=32000), 128, 8)


# -- data without a dataset ------------------------------------------------------------------------

class RandomInputs:
    """Stands in for a datamodule: ``samples`` random inputs of ``bm`` (token sequences, or
    (image, label) pairs) as the train split (the stages draw their calibration batches
    from it)."""

    def __init__(self, bm: BenchModel, samples: int, seed: int = 0):
        from compresslab.tasks import ClassificationTask, LanguageModelingTask

        inputs = bm.batch(samples, seed)
        if bm.text:
            self.items = list(inputs)
            self.block_size = bm.seq_len
            self.task = LanguageModelingTask()
        else:
            self.items = [(x, 0) for x in inputs]
            self.task = ClassificationTask()

    def split(self, name: str):
        return self.items

    def check(self) -> None:
        pass


def apply(model: nn.Module, bm: BenchModel, stages: dict, samples: int = 8):
    """The stages applied through the library API, on ``samples`` random inputs of ``bm``."""
    from compresslab.api import compress_model

    return compress_model(model, stages, RandomInputs(bm, samples))


# -- compressed forms --------------------------------------------------------------------------

class SharedSVD:
    """Plain SVD factors (``PlainSVD``'s: balanced ``U sqrt(S)``, ``sqrt(S) V^T``) with one
    SVD per weight shared by every rank asked for (the benchmark builds many ratios)."""

    needs_calibration = False

    def __init__(self):
        from compresslab.compress.decomposer import PlainSVD

        self.plain = PlainSVD()
        self.cache: dict[str, tuple] = {}

    def __call__(self, weight, rank, name, stats=None):
        if name not in self.cache:
            full = min(weight.shape)
            self.cache[name] = self.plain(weight, full, name)  # every component, balanced
        left, right = self.cache[name]
        return left[:, :rank].clone(), right[:rank].clone()

    def report(self):
        return {}

    def input_statistic(self):
        return None


def lowrank(dense, bm, decomposer, ratio_, round_to=1, round_slack=None):
    from compresslab.stages.compress import LowRankStage

    stage = LowRankStage(decomposer, ratio=ratio_, round_to=round_to, round_slack=round_slack)
    done = apply(copy.deepcopy(dense), bm, {"compress": stage})
    return done.model, {"kind": "lowrank", "target_ratio": ratio_, "round_to": round_to,
                        "round_slack": round_slack,
                        "achieved_ratio": done.metrics["compress/params_ratio"]}


def pruned(dense, bm, ratio_, align=1):
    from compresslab.compress.structured_pruning import MagnitudeScore, UniformAllocation
    from compresslab.stages.prune import StructuredPruneStage

    stage = StructuredPruneStage(ratio_, MagnitudeScore(), UniformAllocation(), None,
                                 calibration={"num_samples": 4, "batch_size": 4},
                                 latency_repeats=0, align_channels=align)
    done = apply(copy.deepcopy(dense), bm, {"prune": stage})
    channels = sorted({v for k, v in done.metrics.items() if "/channels_layer" in k})
    heads = sorted({v for k, v in done.metrics.items() if "/heads_layer" in k})
    return done.model, {"kind": "pruned", "target_ratio": ratio_, "align_channels": align,
                        "mlp_channels": channels, "heads": heads,
                        "achieved_ratio": done.metrics["prune/params_ratio"]}


def merged(dense, bm, which):
    from peft import LoraConfig

    from compresslab.stages.peft import (
        DEFAULT_ROLES,
        MergeAdaptersStage,
        PeftAdapterStage,
        SoKAStage,
    )

    roles = DEFAULT_ROLES if bm.text else None
    if which == "lora":
        stage = PeftAdapterStage(functools.partial(LoraConfig, r=8, lora_alpha=8,
                                                   lora_dropout=0.0), roles=roles)
    else:
        stage = SoKAStage(roles=roles, terms=2, init="zero")
    done = apply(copy.deepcopy(dense), bm, {"adapt": stage, "merge": MergeAdaptersStage()})
    return done.model.eval(), {"kind": f"merged_{which}", "achieved_ratio": 0.0}


def configured_rounding() -> tuple[int, float | None]:
    """``round_to`` and ``round_slack`` of the low-rank methods (method_base/lowrank.yaml)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / "method_base" / "lowrank.yaml")  # every low-rank method
    return int(cfg.get("round_to", 1)), cfg.get("round_slack")


def rounding_name(round_to: int, slack: float | None) -> str:
    return f"lowrank r{ROUNDING_RATIO} round_to={round_to}" + (
        f" slack={slack}" if slack is not None else "")


def variants(bm: BenchModel, dense: nn.Module, rounding: tuple[int, float | None],
             log) -> dict[str, tuple]:
    """name -> (model, info) for every compressed form of ``dense`` (low-rank ratios with
    exact ranks, i.e. ``round_to=1``; one more at ``ROUNDING_RATIO`` with ``rounding``)."""
    out = {"dense": (dense, {"kind": "dense", "achieved_ratio": 0.0})}
    svd = SharedSVD()
    for r in LOWRANK_RATIOS:
        start = time.perf_counter()
        out[f"lowrank r{r}"] = lowrank(dense, bm, svd, r)
        log(f"  built lowrank r{r} ({time.perf_counter() - start:.1f} s)")
    out[rounding_name(*rounding)] = lowrank(dense, bm, svd, ROUNDING_RATIO, *rounding)
    del svd
    for r in PRUNE_RATIOS:
        out[f"pruned {r}"] = pruned(dense, bm, r)
    for r in PRUNE_RATIOS:  # the same with MLP widths that are multiples of 8
        out[f"pruned {r} align_channels=8"] = pruned(dense, bm, r, 8)
    for which in ("lora", "soka"):
        out[f"merged {which}"] = merged(dense, bm, which)
    log(f"  built {len(out) - 1} compressed forms")
    return out


# -- speed ---------------------------------------------------------------------------------------

def generate_fn(model, prompt, new_tokens):
    def run():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=0, eos_token_id=None)
    return run


def summarise(times: dict, per_call: float) -> dict:
    """Medians, per-second rates and paired speed-ups against ``dense``."""
    out = {}
    for name, t in times.items():
        out[name] = {"wall_s": median(t["wall"]), "cpu_s": median(t["cpu"]),
                     "rate": per_call / median(t["wall"]),
                     "speedup": paired_speedup(times["dense"]["wall"], t["wall"]),
                     "cpu_speedup": paired_speedup(times["dense"]["cpu"], t["cpu"]),
                     "wall_samples": t["wall"]}
    return out


@torch.inference_mode()
def measure_speed(bm: BenchModel, forms: dict, repeats: int, device: str, log) -> dict:
    from compresslab.models.architecture import adapter_for

    adapter = adapter_for(forms["dense"][0])
    models = {n: m.to(device) for n, (m, _) in forms.items()}
    one, many = bm.batch(1).to(device), bm.batch(bm.throughput_batch).to(device)
    result = {n: {**info, "params": param_count(m), "weight_bytes": param_bytes(m)}
              for n, (m, info) in forms.items()}
    for n, m in models.items():   # FLOPs per sequence/image, times the batch (exact)
        f = count_flops(lambda m=m: adapter.logits(m, one))
        result[n].update({"flops_b1": f, "flops_throughput": f * bm.throughput_batch})
        if device == "cpu":
            with TensorMemory() as mem:
                adapter.logits(m, many)
            act = mem.peak
        else:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            adapter.logits(m, many)
            act = torch.cuda.max_memory_allocated(device) - base
        result[n].update({"activation_peak_bytes": act,
                          "peak_bytes": act + result[n]["weight_bytes"]})
    dense = result["dense"]
    for r in result.values():
        r["flop_limit"] = ratio(dense["flops_throughput"], r["flops_throughput"])
        r["memory_ratio"] = ratio(dense["peak_bytes"], r["peak_bytes"])
        r["params_ratio"] = ratio(dense["params"], r["params"])
    if device == "cpu" and (warning := busy_machine_warning()):
        log(f"  {warning}")
    log(f"  {bm.name}: latency at batch 1")
    lat = summarise(timed({n: (lambda m=m: adapter.logits(m, one)) for n, m in models.items()},
                          repeats, device), 1)
    log(f"  {bm.name}: throughput at batch {bm.throughput_batch}")
    thr = summarise(timed({n: (lambda m=m: adapter.logits(m, many))
                           for n, m in models.items()}, repeats, device),
                    bm.tokens(bm.throughput_batch))
    gen = None
    if bm.text:
        log(f"  {bm.name}: generation ({bm.new_tokens} new tokens, batch 1, KV cache)")
        prompt = bm.batch(1)[:, :bm.prompt_len].to(device)
        gen = summarise(timed({n: generate_fn(m, prompt, bm.new_tokens)
                               for n, m in models.items()}, repeats, device, target_s=0.5),
                        bm.new_tokens)
    for n in result:
        result[n]["latency"] = lat[n]
        result[n]["throughput"] = thr[n]
        if gen:
            result[n]["generate"] = gen[n]
    return result


# -- rank rounding -------------------------------------------------------------------------------

@torch.inference_mode()
def rounding_study(bm: BenchModel, dense: nn.Module, repeats: int, span: int,
                   log) -> dict:
    """Time one low-rank layer (``LowRankLinear``) of each distinct shape of ``bm`` at every
    rank from ``k - span`` to ``k`` (``k``: the unrounded rank at ``ROUNDING_RATIO``), at
    the throughput batch; time per FLOP of ranks that are multiples of 8/16/32/64 against
    the others, and ``k`` against ``k`` rounded down."""
    from compresslab.compress.lowrank import LowRankLinear
    from compresslab.compress.ratio import rank_for_ratio
    from compresslab.models.architecture import adapter_for

    adapter = adapter_for(dense)
    shapes = sorted({(lin.in_features, lin.out_features)
                     for lin in adapter.compressible_linears(dense).values()})
    rows = bm.tokens(bm.throughput_batch)
    out = {"model": bm.name, "tokens": rows, "ratio": ROUNDING_RATIO, "shapes": []}
    for fan_in, fan_out in shapes:
        k = rank_for_ratio(fan_in, fan_out, ROUNDING_RATIO)
        ranks = list(range(max(1, k - span), k + 1))
        x = torch.randn(rows, fan_in)
        torch.manual_seed(0)
        layers = {r: LowRankLinear(fan_in, fan_out, r, bias=False) for r in ranks}
        times = timed({r: (lambda lay=lay, x=x: lay(x)) for r, lay in layers.items()}, repeats,
                      "cpu", target_s=0.03)
        per_flop = {r: median(times[r]["cpu"]) / (2 * rows * r * (fan_in + fan_out))
                    for r in ranks}
        shape = {"in": fan_in, "out": fan_out, "rank": k,
                 "seconds": {str(r): median(times[r]["cpu"]) for r in ranks},
                 "aligned_vs_other": {}, "rounded": {}}
        for m in ROUND_CANDIDATES:
            aligned = [per_flop[r] for r in ranks if r % m == 0]
            other = [per_flop[r] for r in ranks if r % m]
            if aligned and other:
                shape["aligned_vs_other"][str(m)] = median(aligned) / median(other)
            down = (k // m) * m
            if down in times:
                shape["rounded"][str(m)] = {"rank": down,
                                       "speedup": median(times[k]["cpu"])
                                       / median(times[down]["cpu"]),
                                       "flop_limit": k / down}
        out["shapes"].append(shape)
        log(f"  rounding {bm.name} {fan_out}x{fan_in} rank {k}: time/FLOP aligned/other "
            + ", ".join(f"x{m}: {v:.3f}" for m, v in shape["aligned_vs_other"].items()))
    return out


# -- compression cost (fresh subprocess per measurement) ---------------------------------------

def cost_stage(method: str, cfg_overrides: list[str]):
    """The method's own stage from ``configs/method/<method>.yaml`` (spectrum: the shortlist
    only, i.e. calibration + decomposition, not the gate search)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", *cfg_overrides])
    key = {"spectrum": "shortlist", "numerical_pruning": "prune"}.get(method, "compress")
    node = cfg.method.stages[key]
    extra = {"latency_repeats": 0} if key == "prune" else {}
    return key, instantiate(node, **extra)


def cost_worker(spec: dict) -> dict:
    """One measurement: build the model, run the method's stage, report time and RSS."""
    import transformers  # noqa: F401  (imported before the runtime's RSS is read)

    from compresslab.api import compress_model

    torch.set_num_threads(spec["threads"])
    bm = big_model() if spec["model"] == "llama_1b" else bench_models()[spec["model"]]
    key, stage = cost_stage(spec["method"], spec.get("overrides", []))
    rss_start = current_rss_bytes()            # Python, torch, transformers, hydra: no model
    model = bm.build()
    samples = max(getattr(getattr(stage, "calibration", None), "num_samples", 0), 1)
    data = RandomInputs(bm, samples)
    weights = param_bytes(model)
    rss_model, peak_model = current_rss_bytes(), peak_rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    done = compress_model(model, {key: stage}, data)
    model, metrics = done.model, done.metrics
    del done
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak, params = peak_rss_bytes(), param_count(model)
    del model
    floor = measured_floor(spec["method"], stage, bm, samples)
    return {"model": spec["model"], "method": spec["method"], "stage": key,
            "threads": spec["threads"], "time_s": wall, "cpu_s": cpu,
            "params": params, "model_bytes": weights,
            "rss_start_bytes": rss_start, "rss_model_bytes": rss_model,
            "peak_rss_model_bytes": peak_model, "peak_rss_bytes": peak,
            "rss_end_bytes": current_rss_bytes(), **floor,
            "params_ratio": metrics.get(f"{key}/params_ratio"),
            "calibration_samples": samples if stage_calibrates(stage) else 0}


def measured_floor(method: str, stage, bm: BenchModel, samples: int) -> dict:
    """The method's floor (experiments/bench/floor.py) on a fresh dense copy, timed after
    the stage so that it does not change the stage's peak RSS."""
    import floor

    if method not in floor.FLOOR_METHODS:
        return {}
    from compresslab.models.architecture import adapter_for

    dense = bm.build()
    return floor.floor_seconds(method, stage, dense, adapter_for(dense), bm.batch(samples))


def stage_calibrates(stage) -> bool:
    dec = getattr(stage, "decomposer", None)
    return getattr(dec, "needs_calibration", True)


def run_cost(model: str, method: str, threads: int, log, timeout: int = 3600) -> dict:
    spec = json.dumps({"model": model, "method": method, "threads": threads})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--cost-worker", spec], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode:
        log(f"  cost {model}/{method} FAILED:\n{proc.stderr[-2000:]}")
        return {"model": model, "method": method, "error": proc.stderr[-500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    log(f"  cost {model}/{method}: {result['time_s']:.1f} s ({result['cpu_s']:.1f} CPU s; "
        f"floor {result.get('floor_s', float('nan')):.1f} s), "
        f"peak RSS {result['peak_rss_bytes'] / GiB:.2f} GiB (model "
        f"{result['model_bytes'] / GiB:.2f} GiB)")
    return result


def run_costs(jobs: list[tuple[str, str]], threads: int, parallel: int, log) -> list[dict]:
    """Every (model, method) measurement in its own process, ``parallel`` at a time (the
    slowest first); results in the order given. Each process has its own peak RSS;
    running two single-threaded ones side by side on two cores stretches their wall time
    a little (shared caches and memory bandwidth), their CPU time hardly."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = {n: i for i, n in enumerate(["llama_tiny", "llama_1024x8", "llama_1b"])}
    slow_first = sorted(range(len(jobs)), key=lambda i: (-sizes.get(jobs[i][0], 0),
                                                         jobs[i][1] != "numerical_pruning"))
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = {i: pool.submit(run_cost, *jobs[i], threads, log) for i in slow_first}
        return [futures[i].result() for i in range(len(jobs))]


# -- output ----------------------------------------------------------------------------------------

def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def speed_table(name: str, rows: dict) -> str:
    from compresslab.report import markdown_table

    has_gen = any("generate" in r for r in rows.values())
    unit = "tok/s" if name.startswith("llama") else "img/s"
    header = ["form", "params", "removed", "FLOP limit", "batch-1 ms", "speed-up",
              f"throughput {unit}", "speed-up", "CPU speed-up"]
    if has_gen:
        header += ["generate tok/s", "speed-up"]
    header += ["peak MiB (weights+act.)", "memory"]
    body = []
    for form, r in rows.items():
        line = [form, f"{r['params'] / 1e6:.3g}M", f"{r['achieved_ratio']:.3f}",
                fmt_ratio(r["flop_limit"]), f"{r['latency']['wall_s'] * 1e3:.3g}",
                fmt_ratio(r["latency"]["speedup"]), f"{r['throughput']['rate']:.4g}",
                fmt_ratio(r["throughput"]["speedup"]), fmt_ratio(r["throughput"]["cpu_speedup"])]
        if has_gen:
            line += [f"{r['generate']['rate']:.3g}", fmt_ratio(r["generate"]["speedup"])]
        line += [f"{r['peak_bytes'] / 2**20:.4g}", fmt_ratio(r["memory_ratio"])]
        body.append(line)
    return markdown_table(header, body)


def rounding_table(studies: list[dict]) -> str:
    from compresslab.report import markdown_table

    header = ["model", "layer (out x in)", "rank at 0.5",
              *[f"time/FLOP x{m} vs other ranks" for m in ROUND_CANDIDATES],
              *[f"rank to x{m}: speed-up (FLOP limit)" for m in ROUND_CANDIDATES]]
    body = []
    for st in studies:
        for sh in st["shapes"]:
            body.append([st["model"], f"{sh['out']}x{sh['in']}", sh["rank"],
                         *[f"{sh['aligned_vs_other'][m]:.3f}" if m in sh["aligned_vs_other"]
                           else "-" for m in map(str, ROUND_CANDIDATES)],
                         *[f"{sh['rounded'][m]['speedup']:.2f}x "
                           f"({sh['rounded'][m]['flop_limit']:.2f}x)"
                           if m in sh["rounded"] else "-" for m in map(str, ROUND_CANDIDATES)]])
    return markdown_table(header, body)


def floor_cells(cost: dict) -> list[str]:
    """The floor (forward + linalg seconds) and the stage's wall time in floors."""
    if "floor_s" not in cost:
        return ["-"] * 5
    return [f"{cost['floor_s']:.1f} ({cost['forward_s']:.1f} + {cost['linalg_s']:.1f})",
            fmt_ratio(ratio(cost["time_s"], cost["floor_s"])),
            f"{cost['floor_cpu_s']:.1f}", fmt_ratio(ratio(cost["cpu_s"], cost["floor_cpu_s"])),
            f"{cost['gram_s']:.1f}" if "gram_s" in cost else "-"]


def cost_table(costs: list[dict]) -> str:
    from compresslab.report import markdown_table

    header = ["model", "method (stage)", "threads", "wall s", "CPU s", "floor s (forward + "
              "linalg)", "x floor", "floor CPU s", "x floor CPU", "X^T X s", "peak RSS GiB",
              "model GiB", "peak / model", "runtime RSS GiB", "(peak - runtime) / model",
              "stage adds GiB", "removed"]
    body = []
    for c in costs:
        if "error" in c:
            body.append([c["model"], c["method"], *["failed"] + ["-"] * 15])
            continue
        peak, model, runtime = c["peak_rss_bytes"], c["model_bytes"], c["rss_start_bytes"]
        body.append([c["model"], f"{c['method']} ({c['stage']})", c["threads"],
                     f"{c['time_s']:.1f}", f"{c.get('cpu_s', float('nan')):.1f}",
                     *floor_cells(c),
                     f"{peak / GiB:.2f}", f"{model / GiB:.3g}", f"{peak / model:.2f}",
                     f"{runtime / GiB:.2f}", f"{(peak - runtime) / model:.2f}",
                     f"{(peak - c['peak_rss_model_bytes']) / GiB:.2f}"
                     if "peak_rss_model_bytes" in c else "-",
                     "-" if c["params_ratio"] is None else f"{c['params_ratio']:.3f}"])
    return markdown_table(header, body)


def run_dln_part(out: Path, log) -> dict:
    import dln_bench

    log("dln: ms per GD step")
    steps = dln_bench.step_costs(log=log)
    log("dln: original vs compressed runs")
    return {"steps": steps, "speedups": dln_bench.speedups(out / "dln_runs", log)}


def render(results: dict, tables: Path) -> Path:
    env = results.get("env", {})
    parts = ["# Speed, memory and compression cost (make bench)\n",
             f"Machine: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; torch "
             f"{env.get('torch', '?')}, `torch.set_num_threads({env.get('threads', '?')})`, "
             f"device {', '.join(env.get('devices', ['cpu']))}; {env.get('repeats', '?')} "
             f"interleaved rounds, medians; speed-ups are medians of per-round ratios "
             f"(wall clock; 'CPU speed-up' from process CPU time). FLOP limit = dense FLOPs / "
             f"compressed FLOPs (matrix products and attention). Peak = weights + the "
             f"activation high-water mark of one forward pass at the throughput batch. "
             f"Randomly initialised models. Written {env.get('date', '?')}.\n"]
    for key, rows in results.get("speed", {}).items():
        model = key.split("@")[0]
        settings = results.get("models", {}).get(model, {})
        parts.append(f"\n## {key}\n\n`{json.dumps(settings)}`\n\n" + speed_table(model, rows))
    if results.get("rounding"):
        rnd = results["rounding"]
        parts.append("\n## Rank rounding (`round_to`)\n\nOne `LowRankLinear` per distinct "
                     "shape, every rank from the unrounded rank at ratio 0.5 down by "
                     f"{rnd.get('span', '?')}, at the throughput batch, process CPU time. "
                     "Time per FLOP of ranks that are multiples of m against the other "
                     "ranks (< 1: aligned ranks run faster per FLOP), and the rank rounded "
                     "down to a multiple of m against the unrounded rank (speed-up, with "
                     "its FLOP limit in brackets).\n\n" + rounding_table(rnd["studies"]))
        to, slack = configured_rounding()
        parts.append(f"\nThe method configs round ranks down to multiples of {to} "
                     f"(`round_to`) when that removes at most {slack} more of a layer "
                     f"(`round_slack`); the speed tables compare that (row "
                     f"`{rounding_name(to, slack)}`) with exact ranks (`lowrank r0.5`). "
                     f"docs/bench.md gives the reasons.\n")
    costs = results.get("cost", []) + results.get("big", [])
    if costs:
        parts.append("\n## Compression cost\n\nWall and CPU time of the method's stage with "
                     "its config's defaults (calibration + decomposition/pruning; spectrum: "
                     "its shortlist stage, the gate search excluded; numerical pruning: the "
                     "stage's own latency timing off), random calibration tokens, and the "
                     "peak RSS (VmHWM) of a fresh process that built the fp32 model and ran "
                     "the stage: Python, torch and the model included; 'runtime' is the RSS "
                     "before the model was built, 'stage adds' the peak above the peak "
                     "after building the model. 'floor': what the method cannot avoid, "
                     "timed in the same process (one dense forward pass of the calibration "
                     "set + the SVDs / Cholesky factorisations / solves it must do, "
                     "experiments/bench/floor.py); 'x floor' = wall / floor, 'x floor CPU' "
                     "the same in process CPU time (steadier on a shared machine); "
                     "'X^T X s': one accumulation of every distinct layer input's Gram "
                     "matrix on the calibration tokens, not in the floor. "
                     "Measurements run "
                     f"{results.get('env', {}).get('cost_jobs', 1)} at a time.\n\n"
                     + cost_table(costs))
    if results.get("threads"):
        import threads_bench

        parts.append("\n## Threads\n\n" + threads_bench.table(results["threads"]) + "\n")
    if results.get("dln"):
        import dln_bench

        parts.append("\n## Deep linear networks\n\n" + dln_bench.tables(results["dln"]) + "\n")
    tables.mkdir(parents=True, exist_ok=True)
    path = tables / "bench.md"
    path.write_text("".join(parts))
    try:
        plot(results, tables / "bench.png")
    except Exception as exc:  # the table is the deliverable; a figure failure is reported
        print(f"bench.png not written: {exc}", file=sys.stderr)
    return path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.report import save_figure

    speed = results.get("speed", {})
    if not speed:
        return
    fig, axes = plt.subplots(1, len(speed), figsize=(5 * len(speed), 4), squeeze=False)
    for ax, (key, rows) in zip(axes[0], speed.items()):
        names = [n for n in rows if n != "dense"]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [rows[n]["throughput"]["speedup"] for n in names], 0.4,
               label="throughput speed-up")
        ax.bar([x + 0.2 for x in xs], [rows[n]["latency"]["speedup"] for n in names], 0.4,
               label="batch-1 speed-up", alpha=0.7)
        ax.scatter(list(xs), [rows[n]["flop_limit"] for n in names], color="k", marker="_",
                   s=300, label="FLOP limit", zorder=3)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_ylabel("x dense")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def environment(threads: int, repeats: int, devices: list[str]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "repeats": repeats,
            "devices": devices, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -- main ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench", help="folder of bench.json")
    parser.add_argument("--tables", default="outputs/tables")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every measurement (recorded)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--models", default="llama_tiny,llama_1024x8,vit_tiny")
    parser.add_argument("--only", default="speed,rounding,cost,dln,threads",
                        help="parts to run: speed, rounding, cost, dln, threads, big (merged "
                             "into the JSON)")
    parser.add_argument("--big", action="store_true", help="also run the ~1B memory part")
    parser.add_argument("--round-to", type=int, default=None,
                        help="round_to compared with exact ranks at ratio 0.5 (default: the "
                             "method configs' round_to and round_slack)")
    parser.add_argument("--rounding-span", type=int, default=32,
                        help="ranks below the unrounded one timed by the rounding study")
    parser.add_argument("--devices", default=None,
                        help="comma list (default: cpu, and cuda when present)")
    parser.add_argument("--cost-jobs", type=int, default=None,
                        help="compression-cost processes at a time (default: cores // "
                             "threads, at most 2)")
    parser.add_argument("--table", action="store_true", help="only re-render the table")
    parser.add_argument("--cost-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cost_worker:
        print(json.dumps(cost_worker(json.loads(args.cost_worker))))
        return
    out = Path(args.out)
    json_path = out / "bench.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.table:
        print(render(results, Path(args.tables)).read_text())
        return

    torch.set_num_threads(args.threads)
    if args.cost_jobs is None:
        args.cost_jobs = max(1, min(2, (os.cpu_count() or 1) // args.threads))
    parts = set(args.only.split(",")) | ({"big"} if args.big else set())
    devices = (args.devices.split(",") if args.devices
               else ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    models = bench_models()
    chosen = [m for m in args.models.split(",") if m]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=str))

    env = {**environment(args.threads, args.repeats, devices), "cost_jobs": args.cost_jobs}
    if parts - {"big"}:
        results["env"] = env
    results["models"] = {**results.get("models", {}),
                         **{n: models[n].describe() for n in chosen}}
    if "speed" in parts or "rounding" in parts:
        results.setdefault("speed", {})
        studies = []
        for name in chosen:
            bm = models[name]
            log(f"{name}: building the compressed forms")
            dense = bm.build()
            if "rounding" in parts and bm.text:
                studies.append(rounding_study(bm, dense, max(3, args.repeats - 2),
                                              args.rounding_span, log))
            if "speed" in parts:
                rounding = (configured_rounding() if args.round_to is None
                            else (args.round_to, None))
                forms = variants(bm, dense, rounding, log)
                for device in devices:
                    key = name if device == "cpu" else f"{name}@{device}"
                    results["speed"][key] = measure_speed(bm, forms, args.repeats, device, log)
                    save()
                del forms
        if studies:
            results["rounding"] = {"span": args.rounding_span, "studies": studies}
        save()
    if "cost" in parts:
        jobs = [(name, method) for name in chosen if models[name].text
                for method in COST_METHODS]
        results["cost"] = run_costs(jobs, args.threads, args.cost_jobs, log)
        save()
    if "dln" in parts:
        results["dln"] = run_dln_part(out, log)
        save()
    if "threads" in parts:
        import threads_bench

        log("threads: one training step at 1 thread and at every core")
        results["threads"] = threads_bench.thread_costs({n: models[n] for n in chosen}, log=log)
        save()
    if "big" in parts:
        results["big"] = [{**run_cost("llama_1b", "svd_llm", args.threads, log,
                                      timeout=4 * 3600), "date": env["date"]}]
        save()
    path = render(results, Path(args.tables))
    log(f"wrote {json_path} and {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
