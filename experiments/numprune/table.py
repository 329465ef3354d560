"""Numerical pruning table: quality, parameters and latency of every pruned model.

    python experiments/numprune/table.py --runs outputs/numprune_runs/<stamp>

Writes ``<tables>/numprune.md``, ``<tables>/numprune.png`` (quality against ratio, one
panel per model) and copies the generated-sample grids of the image model (dense and at
``--sample-ratio``) beside them. Rows that did not run are reported as missing, not invented.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compresslab.report import collect_runs, fmt, lookup, markdown_table

LABELS = {"dense": "dense", "numerical": "numerical", "numerical_nocomp": "numerical (no comp.)",
          "numerical_lam0.01": "numerical λ=0.01", "numerical_lam100": "numerical λ=100",
          "magnitude": "magnitude-sp", "wanda": "wanda-sp", "flap": "FLAP"}
BASELINES = ("magnitude", "wanda", "flap")
METRIC = {"pycode": ("ppl", "perplexity"), "digit_tokens": ("bpp", "bits per pixel")}


def by_setting(records: list[dict]) -> dict[tuple[str, str], dict[tuple[str, float], dict]]:
    """(model, dataset) -> (variant, ratio) -> record (ratio None for the dense row); the
    model is labelled with its size, so that sizes are kept apart."""
    out: dict = {}
    for rec in records:
        size = (f"{lookup(rec, 'model.source.num_layers')}x"
                f"{lookup(rec, 'model.source.hidden_size')}")
        key = (f"{lookup(rec, 'model.name')} ({size})", lookup(rec, "dataset.name"))
        ratio = lookup(rec, "method.ratio") if lookup(rec, "variant") != "dense" else None
        out.setdefault(key, {})[(lookup(rec, "variant"), ratio)] = rec
    return out


def comparison(runs: dict, metric: str) -> tuple[list[str], list[list], list[str]]:
    """Ratio x variant table of the test metric, and which ratios numerical wins."""
    variants = [v for v in LABELS if v != "dense" and any(k[0] == v for k in runs)]
    ratios = sorted({r for (_, r) in runs if r is not None})
    dense = runs.get(("dense", None))
    header = ["removed", *[LABELS[v] for v in variants], "numerical best?"]
    rows, notes = [], []
    if dense:
        rows.append(["0 (dense)", *[fmt(dense["metrics"].get(f"test/{metric}"))] * len(variants),
                     ""])
    for ratio in ratios:
        values = {v: runs[(v, ratio)]["metrics"].get(f"test/{metric}")
                  for v in variants if (v, ratio) in runs}
        base = [values[b] for b in BASELINES if values.get(b) is not None]
        best = ("yes" if base and values.get("numerical") is not None
                and values["numerical"] < min(base) else "no" if base else "-")
        rows.append([f"{ratio:.0%}", *[fmt(values[v]) if v in values else "missing"
                                       for v in variants], best])
        notes.append(f"{ratio:.0%}: {best}")
    return header, rows, notes


def details(runs: dict, metric: str) -> tuple[list[str], list[list]]:
    header = ["variant", "target", f"val {metric}", f"test {metric}", "parameters",
              "prunable removed", "latency ms (dense)", "speedup", "CPU ms (dense)",
              "CPU speedup", "sample acc"]
    rows = []
    for (variant, ratio), rec in sorted(runs.items(), key=lambda kv: (
            kv[0][1] or 0, list(LABELS).index(kv[0][0]) if kv[0][0] in LABELS else 99)):
        m = rec["metrics"]
        acc = m.get("samples/classifier_acc")
        rows.append([LABELS.get(variant, variant), "-" if ratio is None else f"{ratio:.0%}",
                     fmt(m[f"val/{metric}"]) if f"val/{metric}" in m else "-",
                     fmt(m.get(f"test/{metric}")), m.get("params/compressed", "-"),
                     fmt(m.get("prune/params_ratio", 0.0)),
                     f"{fmt(m['prune/latency_ms'], 3)} ({fmt(m['prune/latency_dense_ms'], 3)})"
                     if "prune/latency_ms" in m else "-",
                     fmt(m.get("prune/speedup", 1.0), 3),
                     f"{fmt(m['prune/cpu_ms'], 3)} ({fmt(m['prune/cpu_dense_ms'], 3)})"
                     if "prune/cpu_ms" in m else "-",
                     fmt(m.get("prune/cpu_speedup", 1.0), 3), "-" if acc is None else fmt(acc, 3)])
    return header, rows


def plot(settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, ((model, dataset), runs) in zip(axes[0], sorted(settings.items())):
        metric, name = METRIC.get(dataset, ("loss", "loss"))
        for variant, label in LABELS.items():
            points = sorted((r, rec["metrics"][f"test/{metric}"])
                            for (v, r), rec in runs.items() if v == variant
                            and r is not None and f"test/{metric}" in rec["metrics"])
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        if ("dense", None) in runs:
            ax.axhline(runs[("dense", None)]["metrics"][f"test/{metric}"], color="k", ls=":",
                       label="dense")
        ax.set(xlabel="fraction of prunable parameters removed", ylabel=f"test {name}",
               title=f"{model} / {dataset}")
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def copy_sample_grids(settings: dict, out: Path, ratio: float) -> list[str]:
    """The dense model's sample grid and every variant's at ``ratio``, copied beside the table."""
    import shutil

    copied = []
    for runs in settings.values():
        for (variant, r), rec in sorted(runs.items(), key=lambda kv: str(kv[0])):
            png = Path(rec["dir"]) / "samples.png"
            if png.is_file() and (r is None or r == ratio):
                name = f"numprune_samples_{variant}{'' if r is None else f'_r{r}'}.png"
                shutil.copyfile(png, out / name)
                copied.append(name)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the sweep folder (sweep.py --out)")
    parser.add_argument("--tables", default="outputs/tables")
    parser.add_argument("--sample-ratio", type=float, default=0.3,
                        help="copy the generated-sample grids of the runs at this ratio")
    args = parser.parse_args()
    records = collect_runs(args.runs)
    if not records:
        raise SystemExit(f"error: no finished runs below {args.runs}")
    settings = by_setting(records)
    parts = ["# Numerical pruning vs structured baselines\n",
             f"Runs: `{args.runs}` (W&B group `numprune`). `removed`/`target`: fraction of the "
             "prunable (attention + MLP) parameters removed. Latency: fastest of 10 forward "
             "passes on a batch of 64 calibration sequences, pruned model and dense copy taking "
             "turns in the same process; wall clock and process CPU time (the CPU time is not "
             "stretched by other processes sharing the cores).\n"]
    for (model, dataset), runs in sorted(settings.items(), reverse=True):
        metric, name = METRIC.get(dataset, ("loss", "loss"))
        header, rows, notes = comparison(runs, metric)
        parts += [f"\n## {model} / {dataset}: test {name} (lower is better)\n",
                  markdown_table(header, rows),
                  f"\nNumerical beats every baseline at: {', '.join(notes) or '-'}\n",
                  "\n" + markdown_table(*details(runs, metric))]
    out = Path(args.tables)
    out.mkdir(parents=True, exist_ok=True)
    grids = copy_sample_grids(settings, out, args.sample_ratio)
    if grids:
        parts.append(f"\nSample grids (one row per class): {', '.join(grids)}\n")
    text = "".join(parts)
    (out / "numprune.md").write_text(text)
    plot(settings, out / "numprune.png")
    print(text)


if __name__ == "__main__":
    main()
