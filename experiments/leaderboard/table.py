"""The leaderboard table and Pareto plot from the runs of its grid (``grid.yaml``).

    python experiments/leaderboard/table.py --runs outputs/leaderboard_runs/main [--quick]

Per setting, the dense model and every compressed one (rebuilt from ``<run>/compressed``)
are timed in turns in this process with the bench's method (latency: batch 1; throughput:
a batch of 8 sequences / 256 images; speed-up: median over rounds of the per-round ratio
dense / compressed; models randomly initialised where the run saved none, speed depends on
shapes only). Timings are kept in ``<runs>/speed.json`` (``--retime`` measures again).
Writes ``<tables>/leaderboard[_quick].md`` (per setting: every row, then the best row per
budget overall and per family, and what the training bought: each row that trains against
its row without training, the grid's ``untrained`` key) and ``.png`` (quality against
measured throughput speed-up, one marker per method, one line per family: its Pareto front).
Rows that did not run are reported as missing, not invented.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from compresslab.metrics.speed import busy_machine_warning
from compresslab.report import collect_runs, fmt, lookup, markdown_table

QUALITY = {"pycode": ("test/ppl", "test perplexity", False),   # (key, label, higher is better)
           "digits": ("test/acc", "test accuracy", True)}
MARKERS = "osD^v<>pPX*hH8"
MiB = 1024 ** 2


def by_setting(records: list[dict], runs: Path) -> dict[str, dict[tuple[str, float | None], dict]]:
    """setting -> (row, budget) -> record (budget None for the dense reference)."""
    out: dict = {}
    for rec in records:
        rel = Path(rec["dir"]).relative_to(runs).parts
        budget = None if rel[1] == "dense" else float(lookup(rec, "method.ratio"))
        out.setdefault(rel[0], {})[(rel[1], budget)] = rec
    return out


def achieved(metrics: dict) -> float | None:
    """Fraction of the compressible weights the run removed (its stage's ``params_ratio``)."""
    keys = sorted(k for k in metrics if k.endswith("/params_ratio")
                  and not k.startswith("params/") and "model_params" not in k)
    return metrics[keys[-1]] if keys else None


# -- speed ---------------------------------------------------------------------------------------

def dense_model(plan_folder: Path):
    """The dense architecture a compressed folder's plan names, randomly initialised."""
    from compresslab.checkpoints import read_plan, safe_source
    from compresslab.data.spec import DataSpec

    plan = read_plan(plan_folder)
    torch.manual_seed(0)
    spec = DataSpec(**plan["data_spec"])
    return safe_source(plan["model"]["source"], str(plan_folder)).build(spec).eval(), spec


def inputs(spec, batch: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if spec.modality == "text":
        return torch.randint(0, spec.vocab_size, (batch, seq_len), generator=g)
    return torch.randn(batch, spec.channels, spec.image_size, spec.image_size, generator=g)


@torch.inference_mode()
def measure_setting(runs: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Latency and throughput speed-ups of every compressed run of one setting against the
    dense architecture, all timed in turns."""
    from compresslab import load_compressed
    from compresslab.metrics.speed import median, paired_speedup, timed_in_turns
    from compresslab.models.architecture import adapter_for

    folders = {f"{row}@{b}": Path(rec["dir"]) / "compressed" for (row, b), rec in runs.items()
               if (Path(rec["dir"]) / "compressed" / "plan.json").is_file()}
    if not folders:
        return {}
    dense, spec = dense_model(next(iter(folders.values())))
    models = {"dense": dense, **{k: load_compressed(f) for k, f in folders.items()}}
    adapter = adapter_for(dense)
    seq = int(next(iter(runs.values()))["cfg"]["dataset"]["datamodule"].get("block_size") or 0)
    result = {k: {} for k in models}
    for kind, batch in (("latency", 1), ("throughput", 8 if spec.modality == "text" else 256)):
        x = inputs(spec, batch, seq)
        times = timed_in_turns({k: (lambda m=m, x=x: adapter.logits(m, x))
                                for k, m in models.items()},
                               repeats)
        for k in models:
            result[k][f"{kind}_ms"] = 1e3 * median(times[k]["wall"])
            result[k][f"{kind}_speedup"] = paired_speedup(times["dense"]["wall"], times[k]["wall"])
    return result


def speeds(settings: dict, runs_dir: Path, repeats: int, retime: bool) -> dict:
    path = runs_dir / "speed.json"
    known = json.loads(path.read_text()) if path.is_file() and not retime else {}
    for name, runs in settings.items():
        wanted = {f"{row}@{b}" for (row, b) in runs if b is not None}
        if not wanted <= set(known.get(name, {})):
            print(f"timing {name}: dense and {len(wanted)} compressed models in turns", flush=True)
            if warning := busy_machine_warning():
                print(warning, flush=True)
            known[name] = measure_setting(runs, repeats)
            path.write_text(json.dumps(known, indent=1))
    return known


# -- table ---------------------------------------------------------------------------------------

HEADER = ["method", "family", "budget", "removed", "parameters", "quality", "zero-shot acc",
          "latency speed-up", "throughput speed-up", "compression s",
          "peak RSS MiB (+added)"]


def table_rows(runs: dict, speed: dict, plan: dict, quality_key: str) -> list[list]:
    rows = []
    for (row, budget), rec in sorted(runs.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        m = rec["metrics"]
        t = speed.get("dense" if budget is None else f"{row}@{budget}", {})
        zero = [v for k, v in m.items() if k.startswith("lm_eval/") and k.endswith("/acc")]
        family = "-" if budget is None else plan["rows"].get(row, {}).get("family", "?")
        label = row + (" (trains)" if plan["rows"].get(row, {}).get("trains") else "")
        rows.append([label, family, "-" if budget is None else f"{budget:.0%}",
                     "-" if budget is None else fmt(achieved(m) or float("nan"), 3),
                     m.get("params/compressed", "-"), fmt(m.get(quality_key, float("nan"))),
                     fmt(zero[0], 3) if zero else "-",
                     fmt(t["latency_speedup"], 3) if t else "-",
                     fmt(t["throughput_speedup"], 3) if t else "-",
                     *cost_cells(m, budget is None)])
    return rows


def cost_cells(m: dict, dense: bool) -> list[str]:
    """Compression wall time and peak RSS (with what the stages added), '-' for the dense
    reference (no stages) and runs from before these were recorded."""
    if dense or "cost/stages_s" not in m:
        return ["-", "-"]
    return [fmt(m["cost/stages_s"], 3), f"{m['cost/peak_rss_bytes'] / MiB:.0f} "
            f"(+{m.get('cost/peak_rss_increase_bytes', 0) / MiB:.0f})"]


# -- the answers: best per budget, what the training bought --------------------------------------

def best_rows(runs: dict, speed: dict, plan: dict, quality_key: str,
              higher: bool) -> tuple[list[list], list[str]]:
    """Per budget: the best row overall and the best of each family, by quality (ties: the
    faster one, and how many tie), each with its quality and throughput speed-up; and the
    families."""
    family = {row: plan["rows"].get(row, {}).get("family", "?") for row, _ in runs}
    families = sorted({family[row] for row, b in runs if b is not None})
    out = []
    for budget in sorted({b for _, b in runs if b is not None}):
        here = {row: (rec["metrics"][quality_key],
                      speed.get(f"{row}@{budget}", {}).get("throughput_speedup", 0.0))
                for (row, b), rec in runs.items()
                if b == budget and rec["metrics"].get(quality_key) is not None}
        out.append([f"{budget:.0%}", *(
            best_cell({r: v for r, v in here.items() if fam is None or family[r] == fam}, higher)
            for fam in [None, *families])])
    return out, families


def best_cell(pool: dict[str, tuple[float, float]], higher: bool) -> str:
    """``row (quality, speed-up[; n tied])`` of the best of ``pool`` (row -> (quality,
    speed-up)); ties on quality go to the faster row."""
    if not pool:
        return "-"
    def rank(row: str) -> tuple[float, float]:
        quality, speedup = pool[row]
        return (quality if higher else -quality), speedup

    best = max(pool, key=rank)
    quality, speedup = pool[best]
    tied = sum(rank(row)[0] == rank(best)[0] for row in pool) - 1
    timed = f"{fmt(speedup, 3)}x" if speedup else "not timed"
    return f"{best} ({fmt(quality)}, {timed}{f'; {tied} tied' if tied else ''})"


def training_gains(runs: dict, plan: dict, quality_key: str, higher: bool) -> list[list]:
    """Every row that trains against its row without training (grid key ``untrained``) at
    each budget: both qualities and the relative change (positive: the training helped)."""
    out = []
    for (row, budget), rec in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        twin = plan["rows"].get(row, {}).get("untrained")
        if budget is None or twin is None or (twin, budget) not in runs:
            continue
        q, q0 = rec["metrics"].get(quality_key), runs[(twin, budget)]["metrics"].get(quality_key)
        if q is None or q0 is None:
            continue
        gain = (q - q0) / q0 if higher else (q0 - q) / q0
        out.append([row, f"{budget:.0%}", fmt(q), twin, fmt(q0), f"{gain:+.1%}"])
    return out


def answers(runs: dict, speed: dict, plan: dict, quality_key: str, higher: bool) -> list[str]:
    best, families = best_rows(runs, speed, plan, quality_key, higher)
    parts = []
    if best:
        parts += ["\nBest at each budget (quality, throughput speed-up):\n\n",
                  markdown_table(["budget", "best", *(f"best {f}" for f in families)], best)]
    gains = training_gains(runs, plan, quality_key, higher)
    if gains:
        parts += ["\nWhat the training bought (same budget, the row without training beside "
                  "it; change: relative quality, positive = better):\n\n",
                  markdown_table(["row (trains)", "budget", "quality", "without training",
                                  "quality", "change"], gains)]
    return parts


def missing_runs(runs: dict, plan: dict, setting: str) -> list[str]:
    return [f"{row} r{b}" for row in plan["settings"][setting]["rows"]
            for b in plan["budgets"] if (row, float(b)) not in runs]


# -- Pareto plot ---------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]], higher_better: bool) -> list[tuple]:
    """Points no other point beats in both speed-up (x, higher better) and quality (y)."""
    better = (lambda a, b: a >= b) if higher_better else (lambda a, b: a <= b)
    front = [p for p in points if not any(q != p and q[0] >= p[0] and better(q[1], p[1])
                                          for q in points)]
    return sorted(front)


def plot(settings: dict, speed: dict, plan: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.report import save_figure

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    colors = {"low-rank": "tab:blue", "pruning": "tab:red"}
    for ax, (name, runs) in zip(axes[0], sorted(settings.items())):
        dataset = lookup(next(iter(runs.values())), "dataset.name")
        key, label, higher = QUALITY.get(dataset, ("test/loss", "test loss", False))
        families: dict[str, list] = {}
        for i, row in enumerate(sorted({r for r, b in runs if b is not None})):
            family = plan["rows"].get(row, {}).get("family", "?")
            pts = [(speed[name][f"{row}@{b}"]["throughput_speedup"], rec["metrics"][key])
                   for (r, b), rec in runs.items() if r == row and b is not None
                   and f"{row}@{b}" in speed.get(name, {}) and key in rec["metrics"]]
            if pts:
                ax.scatter(*zip(*pts), marker=MARKERS[i % len(MARKERS)],
                           color=colors.get(family, "gray"), label=row, zorder=3)
                families.setdefault(family, []).extend(pts)
        for family, pts in families.items():
            ax.plot(*zip(*pareto_front(pts, higher)), color=colors.get(family, "gray"),
                    alpha=0.5, label=f"{family} front")
        if ("dense", None) in runs and key in runs[("dense", None)]["metrics"]:
            ax.axhline(runs[("dense", None)]["metrics"][key], color="k", ls=":", label="dense")
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set(xlabel="measured throughput speed-up (dense / compressed)", ylabel=label,
               title=name)
        if not higher:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


GRID = Path(__file__).with_name("grid.yaml")


def load_plan(quick: bool) -> dict:
    """The leaderboard's rows (family, trains), budgets, settings and timing rounds, from
    its grid (``grid.yaml``, the ``quick`` variant for the smoke run)."""
    from compresslab.grid import load_grid

    return plan_from_grid(load_grid(GRID, "quick" if quick else None))


def plan_from_grid(grid: dict) -> dict:
    return {"rows": grid["rows"], "budgets": grid["axes"]["ratio"]["values"],
            "settings": {name: {"rows": [r for r in (s["rows"] or grid["rows"]) if r != "dense"]}
                         for name, s in grid["settings"].items()},
            **grid["table"]}


def render(runs_dir: Path, tables: Path, quick: bool, retime: bool = False,
           plan: dict | None = None) -> Path:
    plan = plan or load_plan(quick)
    records = collect_runs(runs_dir)
    if not records:
        raise SystemExit(f"error: no finished runs below {runs_dir}")
    settings = by_setting(records, runs_dir)
    speed = speeds(settings, runs_dir, int(plan["repeats"]), retime)
    stem = "leaderboard_quick" if quick else "leaderboard"
    parts = [f"# Leaderboard{' (quick smoke settings)' if quick else ''}\n\n",
             f"Runs: `{runs_dir}` (W&B group `leaderboard`). budget: the `ratio` asked for; "
             "removed: the fraction of the compressible weights the run removed. Methods "
             f"that train get {plan['recovery_steps']} recovery steps. Speed-ups: measured "
             "here, dense and compressed timed in turns in one process, median of per-round "
             "ratios (latency: batch 1; throughput: a full batch); compression s and peak "
             "RSS: the run's stages. docs/leaderboard.md says what this can and cannot "
             f"show. Plot: `{stem}.png`.\n"]
    for name, runs in sorted(settings.items()):
        dataset = lookup(next(iter(runs.values())), "dataset.name")
        key, label, higher = QUALITY.get(dataset, ("test/loss", "test loss", False))
        parts += [f"\n## {name} / {dataset}: quality = {label} "
                  f"({'higher' if higher else 'lower'} is better)\n\n",
                  markdown_table(HEADER, table_rows(runs, speed.get(name, {}), plan, key)),
                  *answers(runs, speed.get(name, {}), plan, key, higher)]
        if name in plan["settings"]:
            gone = missing_runs(runs, plan, name)
            parts.append(f"\nMissing runs: {', '.join(gone) if gone else 'none'}\n")
    tables.mkdir(parents=True, exist_ok=True)
    out = tables / f"{stem}.md"
    out.write_text("".join(parts))
    plot(settings, speed, plan, tables / f"{stem}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the grid's folder (grid --out)")
    parser.add_argument("--tables", default="outputs/tables")
    parser.add_argument("--quick", action="store_true", help="the smoke variant's settings")
    parser.add_argument("--retime", action="store_true", help="measure the speed-ups again")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # as the runs (threads=1): tiny models time steadier
    print(render(Path(args.runs), Path(args.tables), args.quick, args.retime).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
