"""Numerical pruning table: quality, parameters and latency of every pruned model, mean ± std
over base models, bold only where a lead holds beyond the spread.

    python experiments/numprune/table.py --runs outputs/numprune_runs/main

Reads the runs of ``python -m compresslab.grid experiments/numprune/grid.yaml`` (any folder
layout: each run's config says its row, ratio and seeds). Writes ``<tables>/numprune.md``,
``<tables>/numprune.png`` (test quality against ratio, one panel per model) and copies the
generated-sample grids of the image model (dense and at ``--sample-ratio``, base model 0)
beside them. Rows that did not run are reported as missing, not invented.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compresslab.report import (
    BOLD_RULE,
    bold_verdict,
    collect_runs,
    fmt_seeded,
    lookup,
    markdown_table,
    seeded_cells,
    verdict_note,
)

LABELS = {"dense": "dense", "numerical_global": "numerical (global, the paper's)",
          "numerical_per_layer": "numerical (per-layer, the default)",
          "numerical": "numerical", "numerical_nocomp": "numerical (global, no comp.)",
          "numerical_lam0.01": "numerical λ=0.01", "numerical_lam100": "numerical λ=100",
          "magnitude": "magnitude-sp", "wanda": "wanda-sp", "flap": "FLAP"}
METRIC = {"pycode": ("ppl", "perplexity"), "digit_tokens": ("bpp", "bits per pixel")}
BASELINES = ("magnitude", "wanda", "flap")
NUMERICAL = ("numerical_global", "numerical_per_layer")   # the paper's allocation, the default
REPO = Path(__file__).resolve().parents[2]
GRID = Path(__file__).with_name("grid.yaml")
#: the latency column: only the paired speed-up (dense and pruned timed in turns in one
#: process, median of per-round ratios: metrics/speed.py, as make bench measures)
SPEEDUP = "prune/speedup"
CPU_SPEEDUP = "prune/cpu_speedup"


def setting_of(rec: dict) -> tuple[str, str]:
    """(model labelled with its size, dataset): sizes are kept apart."""
    size = f"{lookup(rec, 'model.source.num_layers')}x{lookup(rec, 'model.source.hidden_size')}"
    return f"{lookup(rec, 'model.name')} ({size})", lookup(rec, "dataset.name")


def by_setting(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict = {}
    for rec in records:
        out.setdefault(setting_of(rec), []).append(rec)
    return out


def ratio_of(rec: dict) -> float | None:
    return None if lookup(rec, "variant") == "dense" else lookup(rec, "method.ratio")


def variant_order(variant: str) -> tuple[int, str]:
    return (list(LABELS).index(variant) if variant in LABELS else len(LABELS), variant)


def cells_of(records: list[dict], metric: str) -> dict[tuple[str, float | None], object]:
    """(variant, ratio) -> seeded cell of ``metric`` (ratio None: the dense row)."""
    for rec in records:
        rec["cfg"]["table_ratio"] = ratio_of(rec)
    return seeded_cells(records, ["variant", "table_ratio"], metric)


def table_rows(wanted: str | None) -> set[str] | None:
    """The variants the table shows: the grid's rows that are not optional (``None``: all
    that ran; ``wanted``: a comma-separated list)."""
    if wanted == "all":
        return None
    if wanted:
        return set(wanted.split(","))
    from compresslab.grid import load_grid

    return {r for r, spec in load_grid(GRID)["rows"].items() if not spec.get("optional")}


def comparison(records: list[dict], split: str, metric: str
               ) -> tuple[list[str], list[list[str]], list[str]]:
    """Ratio x variant table of ``split``'s metric (mean ± std over base models, bold by
    the bold rule among the pruned variants), and per ratio the bold rule's verdict and the
    verdicts of numerical pruning (each allocation) against the baselines alone."""
    cells = cells_of(records, f"{split}/{metric}")
    variants = sorted({v for v, r in cells if r is not None}, key=variant_order)
    ratios = sorted({r for _, r in cells if r is not None})
    header = ["removed", "dense", *[LABELS.get(v, v) for v in variants]]
    dense = fmt_seeded(cells.get(("dense", None)))
    rows, notes = [], []
    for ratio in ratios:
        row = {v: cells[(v, ratio)] for v in variants if (v, ratio) in cells}
        verdict = bold_verdict(row, lower_is_better=True)
        rows.append([f"{ratio:.0%}", dense,
                     *[fmt_seeded(row.get(v), bold=verdict.bold and v == verdict.best)
                       if v in row else "missing" for v in variants]])
        notes.append(verdict_note(f"{ratio:.0%}", verdict, lambda v: LABELS.get(v, v)))
        for mine in NUMERICAL:     # the headline claim: numerical against the baselines
            if mine in row and any(b in row for b in BASELINES):
                versus = bold_verdict({v: row[v] for v in (mine, *BASELINES) if v in row}, True)
                notes.append(verdict_note(f"{ratio:.0%}, {LABELS[mine]} against the baselines "
                                          "only", versus, lambda v: LABELS.get(v, v)))
    return header, rows, notes


def details(records: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """Per variant and ratio: base models, quality, parameters removed, paired speed-ups."""
    keys = {"val": f"val/{metric}", "test": f"test/{metric}", "removed": "prune/params_ratio",
            "speedup": SPEEDUP, "cpu": CPU_SPEEDUP, "samples": "samples/classifier_acc"}
    cells = {name: cells_of(records, key) for name, key in keys.items()}
    header = ["variant", "target", "base models", f"val {metric}", f"test {metric}",
              "prunable removed", "latency speed-up (paired)", "CPU-time speed-up (paired)",
              "sample acc"]
    rows = []
    for variant, ratio in sorted({k for c in cells.values() for k in c},
                                 key=lambda k: (k[1] or 0, variant_order(k[0]))):
        got = {name: c.get((variant, ratio)) for name, c in cells.items()}
        n = max((c.n for c in got.values() if c is not None), default=0)
        rows.append([LABELS.get(variant, variant), "-" if ratio is None else f"{ratio:.0%}", n,
                     fmt_seeded(got["val"]), fmt_seeded(got["test"]),
                     fmt_seeded(got["removed"], digits=3),
                     fmt_seeded(got["speedup"], digits=3), fmt_seeded(got["cpu"], digits=3),
                     fmt_seeded(got["samples"], digits=3)])
    return header, rows


def plot(settings: dict, path: Path) -> None:
    """Test quality against ratio: mean over base models, bars of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.report import save_figure

    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, ((model, dataset), records) in zip(axes[0], sorted(settings.items())):
        metric, name = METRIC.get(dataset, ("loss", "loss"))
        cells = cells_of(records, f"test/{metric}")
        for variant in sorted({v for v, r in cells if r is not None}, key=variant_order):
            points = sorted((r, c) for (v, r), c in cells.items() if v == variant
                            and r is not None)
            ax.errorbar([r for r, _ in points], [c.mean for _, c in points],
                        yerr=[c.std for _, c in points], marker="o", capsize=3,
                        label=LABELS.get(variant, variant))
        if ("dense", None) in cells:
            ax.axhline(cells[("dense", None)].mean, color="k", ls=":", label="dense")
        ax.set(xlabel="fraction of prunable parameters removed", ylabel=f"test {name}",
               title=f"{model} / {dataset}")
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def copy_sample_grids(settings: dict, out: Path, ratio: float) -> list[str]:
    """The dense model's sample grid and every variant's at ``ratio`` (base model 0)."""
    import shutil

    copied = []
    for records in settings.values():
        for rec in sorted(records, key=lambda r: r["dir"]):
            png, r = Path(rec["dir"]) / "samples.png", ratio_of(rec)
            if (png.is_file() and (r is None or r == ratio)
                    and lookup(rec, "model.pretrain.seed", 0) == 0):
                suffix = "" if r is None else f"_r{r}"
                name = f"numprune_samples_{lookup(rec, 'variant')}{suffix}.png"
                shutil.copyfile(png, out / name)
                copied.append(name)
    return sorted(set(copied))


def render(runs: Path, tables: Path, sample_ratio: float = 0.3, rows: str | None = None) -> str:
    shown = table_rows(rows)
    records = [r for r in collect_runs(runs) if shown is None or lookup(r, "variant") in shown]
    if not records:
        raise SystemExit(f"error: no finished runs below {runs}")
    settings = by_setting(records)
    parts = ["# Numerical pruning vs structured baselines\n\n",
             f"Runs: `{runs}` (W&B group `numprune`). `removed`/`target`: fraction of the "
             "prunable (attention + MLP) parameters removed. " + BOLD_RULE + " Latency: only "
             "the paired speed-up — the pruned model and a copy of the dense one take turns "
             "in the same process (10 rounds on a batch of 64 calibration sequences), the "
             "median of the per-round ratios dense / pruned, as `make bench` measures; CPU "
             "time likewise ('-': not measured).\n"]
    for (model, dataset), recs in sorted(settings.items(), reverse=True):
        metric, name = METRIC.get(dataset, ("loss", "loss"))
        for split in ("test", "val"):
            header, rows, notes = comparison(recs, split, metric)
            if not rows:
                continue
            parts += [f"\n## {model} / {dataset}: {split} {name} (lower is better)\n\n",
                      markdown_table(header, rows), "\nBold rule per ratio:\n\n",
                      "\n".join(notes) + "\n"]
        parts += [f"\n### {model} / {dataset}: details\n\n", markdown_table(*details(recs, metric))]
    tables.mkdir(parents=True, exist_ok=True)
    grids = copy_sample_grids(settings, tables, sample_ratio)
    if grids:
        parts.append(f"\nSample grids (one row per class): {', '.join(grids)}\n")
    text = "".join(parts)
    (tables / "numprune.md").write_text(text)
    plot(settings, tables / "numprune.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the grid's folder (grid --out)")
    parser.add_argument("--tables", default="outputs/tables")
    parser.add_argument("--sample-ratio", type=float, default=0.3,
                        help="copy the generated-sample grids of the runs at this ratio")
    parser.add_argument("--rows", help="comma-separated variants to show, or 'all' (default: "
                        "the grid's rows that are not optional, i.e. not the lambda ones)")
    args = parser.parse_args(argv)
    print(render(Path(args.runs), Path(args.tables), args.sample_ratio, args.rows))


if __name__ == "__main__":
    main()
