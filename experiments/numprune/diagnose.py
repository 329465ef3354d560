"""Why numerical pruning falls behind at 30-50 %: which structures it removes, how well posed
its solves are, and what lambda and the allocation do — on the validation split only.

    python experiments/numprune/diagnose.py --runs outputs/numprune_runs/main \\
        [--settings llama_tiny,ar_image] [--ratios 0.3,0.5] [--base-seeds 0,1,2] [--no-run]

Runs (through the grid runner, into the numprune table's folder: cells it already has are
reused) numerical pruning with the paper's global allocation at lambda 0.01, 1 and 100,
numerical pruning with the per-layer allocation, and wanda-sp, then writes
``<tables>/numprune_diagnose.md`` (val perplexity per variant, mean ± std over base models
with the bold rule; attention heads and MLP channels removed per block; the condition
number and smallest eigenvalue of the score and compensation solves per block) and the
figure ``--figure`` (default docs/figures/numprune_structures.png). Test metrics are never
read here: every choice this informs is made on val.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compresslab.grid import load_grid, run_grid
from compresslab.report import (
    BOLD_RULE,
    bold_verdict,
    collect_runs,
    fmt,
    fmt_seeded,
    lookup,
    markdown_table,
    seeded_cells,
    verdict_note,
)

REPO = Path(__file__).resolve().parents[2]
GRID = Path(__file__).with_name("grid.yaml")
#: the variants compared: lambda (global allocation), the allocation, and the baseline that
#: wins at 30-50 % on the paper's allocation
VARIANTS = {"numerical_lam0.01": "numerical global, λ=0.01",
            "numerical_global": "numerical global, λ=1 (paper)",
            "numerical_lam100": "numerical global, λ=100",
            "numerical_per_layer": "numerical per-layer",
            "wanda": "wanda-sp (per-layer)"}
STRUCTURE_VARIANTS = ["numerical_global", "numerical_per_layer", "wanda"]


def ensure_runs(runs: Path, settings: list[str], ratios: list[float],
                base_seeds: list[int], extra: list[str]) -> list[str]:
    """Run the missing cells of the diagnosis (finished ones are skipped)."""
    grid = load_grid(GRID)
    return run_grid(grid, runs, settings=settings, rows=list(VARIANTS),
                    values={"ratio": ratios, "base_seed": base_seeds, "calib_seed": [0]},
                    extra=extra)


def selected(records: list[dict], ratios: list[float], base_seeds: list[int]) -> list[dict]:
    return [r for r in records if lookup(r, "variant") in VARIANTS
            and lookup(r, "method.ratio") in ratios
            and lookup(r, "model.pretrain.seed", 0) in base_seeds]


#: the val metric of each kind of setting: perplexity (text) or bits per pixel (images)
VAL_METRICS = {"val/ppl": "val perplexity", "val/bpp": "val bits per pixel"}


def val_metric(records: list[dict]) -> str:
    """The val metric these runs logged (the first of VAL_METRICS that any run has)."""
    return next((key for key in VAL_METRICS if any(key in r["metrics"] for r in records)),
                "val/ppl")


def val_table(records: list[dict], ratios: list[float]) -> str:
    """Val perplexity (or bpp) per variant and ratio (mean ± std over base models), bold rule."""
    cells = seeded_cells(records, ["variant", "method.ratio"], val_metric(records))
    rows, notes = [], []
    for ratio in ratios:
        row = {v: cells[(v, ratio)] for v in VARIANTS if (v, ratio) in cells}
        verdict = bold_verdict(row, lower_is_better=True)
        rows.append([f"{ratio:.0%}", *[fmt_seeded(row.get(v), verdict.bold and v == verdict.best)
                                      for v in VARIANTS]])
        notes.append(verdict_note(f"{ratio:.0%}", verdict, lambda v: VARIANTS.get(v, v)))
    return (markdown_table(["removed", *VARIANTS.values()], rows) + "\nBold rule per ratio "
            "(val):\n\n" + "\n".join(notes) + "\n")


def layers_of(rec: dict) -> int:
    return int(lookup(rec, "model.source.num_layers"))


def removed_per_layer(rec: dict) -> tuple[list[int], list[int]]:
    """Attention heads and MLP channels removed in each block of one run."""
    heads = int(lookup(rec, "model.source.num_heads"))
    channels = int(lookup(rec, "model.source.intermediate_size"))
    m = rec["metrics"]
    return ([heads - int(m[f"prune/heads_layer{i}"]) for i in range(layers_of(rec))],
            [channels - int(m[f"prune/channels_layer{i}"]) for i in range(layers_of(rec))])


def structures_table(records: list[dict], ratios: list[float]) -> str:
    """Heads / channels removed per block, per variant and ratio (each base model: h/c)."""
    rows = []
    for ratio in ratios:
        for variant in STRUCTURE_VARIANTS:
            runs = sorted((r for r in records if lookup(r, "variant") == variant
                           and lookup(r, "method.ratio") == ratio),
                          key=lambda r: lookup(r, "model.pretrain.seed", 0))
            if not runs:
                continue
            per_base = [removed_per_layer(r) for r in runs]
            blocks = [" / ".join(f"{h[i]}h {c[i]}c" for h, c in per_base)
                      for i in range(layers_of(runs[0]))]
            rows.append([f"{ratio:.0%}", VARIANTS[variant], *blocks])
    n = max((layers_of(r) for r in records), default=0)
    return markdown_table(["removed", "variant", *[f"block {i}" for i in range(n)]], rows)


def conditioning_table(records: list[dict], ratios: list[float]) -> str:
    """Score and compensation solves of numerical pruning (global, lambda 1) per block:
    condition number and smallest eigenvalue after damping, mean over base models."""
    rows = []
    for ratio in ratios:
        runs = [r for r in records if lookup(r, "variant") == "numerical_global"
                and lookup(r, "method.ratio") == ratio]
        if not runs:
            continue
        for i in range(layers_of(runs[0])):
            for kind in ("attention", "mlp"):
                cells = []
                for key in (f"prune/score_cond/block{i}_{kind}",
                            f"prune/score_min_eig/block{i}_{kind}",
                            f"prune/compensation_cond/block{i}_{kind}",
                            f"prune/compensation_min_eig/block{i}_{kind}"):
                    values = [r["metrics"][key] for r in runs if key in r["metrics"]]
                    cells.append(fmt(sum(values) / len(values), 3) if values else "-")
                rows.append([f"{ratio:.0%}", f"block {i} {kind}", *cells])
    return markdown_table(["removed", "layer", "score cond", "score min eig",
                           "compensation cond", "compensation min eig"], rows)


def plot_structures(records: list[dict], ratios: list[float], path: Path) -> Path:
    """Per block: fraction of attention heads (top) and MLP channels (bottom) removed by each
    variant at each ratio, mean over base models with the range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from compresslab.report import save_figure

    fig, axes = plt.subplots(2, len(ratios), figsize=(5 * len(ratios), 6.5), squeeze=False)
    width = 0.8 / len(STRUCTURE_VARIANTS)
    for col, ratio in enumerate(ratios):
        for k, variant in enumerate(STRUCTURE_VARIANTS):
            runs = [r for r in records if lookup(r, "variant") == variant
                    and lookup(r, "method.ratio") == ratio]
            if not runs:
                continue
            heads = int(lookup(runs[0], "model.source.num_heads"))
            channels = int(lookup(runs[0], "model.source.intermediate_size"))
            removed = [removed_per_layer(r) for r in runs]
            for row, (index, total) in enumerate(((0, heads), (1, channels))):
                frac = np.array([r[index] for r in removed], dtype=float) / total
                x = np.arange(frac.shape[1]) + (k - 1) * width
                mean = frac.mean(0)
                axes[row][col].bar(x, mean, width, label=VARIANTS[variant],
                                   yerr=[mean - frac.min(0), frac.max(0) - mean], capsize=2)
        for row, what in enumerate(("attention heads", "MLP channels")):
            ax = axes[row][col]
            ax.axhline(ratio, color="k", ls=":", lw=1, label=f"{ratio:.0%} target")
            ax.set(title=f"{what} removed at {ratio:.0%}", xlabel="block",
                   ylabel="fraction removed", ylim=(0, 1.05))
            ax.set_xticks(range(layers_of(records[0])))
            ax.grid(alpha=0.3, axis="y")
        axes[0][col].legend(fontsize=7)
    return save_figure(fig, path)


def setting_of(rec: dict, runs: Path) -> str:
    """The grid setting of a run: the first folder below the grid's folder."""
    return Path(rec["dir"]).resolve().relative_to(runs.resolve()).parts[0]


def report(runs: Path, ratios: list[float], base_seeds: list[int], tables: Path,
           figure: Path, settings: list[str] | None = None) -> str:
    """The diagnosis of ``settings`` (default: every setting with runs); one figure each,
    ``figure`` itself for the first and ``<stem>_<setting>`` for the others."""
    records = selected(collect_runs(runs), ratios, base_seeds)
    found = sorted({setting_of(r, runs) for r in records})
    settings = [s for s in (settings or found) if s in found]
    if not settings:
        raise SystemExit(f"error: no finished diagnosis runs below {runs}")
    parts = ["# Numerical pruning at 30-50 %: diagnosis (validation split only)\n\n",
             f"Runs: `{runs}`; base models {', '.join(map(str, base_seeds))}. {BOLD_RULE}\n"]
    figures = []
    for index, setting in enumerate(settings):
        recs = [r for r in records if setting_of(r, runs) == setting]
        model, dataset = lookup(recs[0], "model.name"), lookup(recs[0], "dataset.name")
        title = VAL_METRICS.get(val_metric(recs), val_metric(recs))
        parts += [f"\n## {model} / {dataset}: {title}\n\n", val_table(recs, ratios),
                  "\n### Structures removed per block (heads h, MLP channels c; one entry per "
                  "base model, separated by /)\n\n", structures_table(recs, ratios),
                  "\n### Conditioning of numerical pruning's solves (global, λ=1; mean over "
                  "base models)\n\n", conditioning_table(recs, ratios)]
        path = figure if index == 0 else figure.with_stem(f"{figure.stem}_{setting}")
        figures.append(plot_structures(recs, ratios, path))
    shown = [f"`{p.relative_to(REPO) if p.is_relative_to(REPO) else p}`" for p in figures]
    parts.append(f"\nFigure{'s' if len(shown) > 1 else ''}: {', '.join(shown)}\n")
    text = "".join(parts)
    tables.mkdir(parents=True, exist_ok=True)
    (tables / "numprune_diagnose.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the numprune grid's folder")
    parser.add_argument("--settings", default="llama_tiny,ar_image",
                        help="grid settings, comma-separated")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--base-seeds", default="0,1,2")
    parser.add_argument("--tables", default="outputs/tables")
    parser.add_argument("--figure", default=str(REPO / "docs/figures/numprune_structures.png"))
    parser.add_argument("--no-run", action="store_true", help="only read finished runs")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.base_seeds.split(",")]
    if not args.no_run:
        failed = ensure_runs(Path(args.runs), args.settings.split(","), ratios, seeds,
                             argv[cut + 1:])
        if failed:
            print("error: some diagnosis runs failed:\n  " + "\n  ".join(failed),
                  file=sys.stderr)
    print(report(Path(args.runs), ratios, seeds, Path(args.tables), Path(args.figure),
                 args.settings.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
