"""PELA ablation table: rows dense | LRA | LRA+fine-tune | LRA+FD | LRA+FD+WPR per model and
ratio; columns parameters, val and test accuracy or perplexity after the downstream
fine-tuning (mean ±
std over seeds), training time, and the same metric before any training and after the
intermediate stage.

    python experiments/pela/table.py --runs outputs/pela_runs/<stamp>

Writes ``<tables>/pela.md`` and ``<tables>/pela.png`` (ViT accuracy against ratio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compresslab.report import aggregate, collect_runs, fmt_mean_std, line_plot

ROW_LABELS = {"dense": "dense", "lra": "LRA", "lra_ft": "LRA + fine-tune",
              "lra_fd": "LRA + FD", "lra_fd_wpr": "LRA + FD + WPR"}
METRIC = {"digits": "acc", "pycode": "ppl"}
TIMED_STAGES = ("decompose", "pretrain", "finetune")


def with_train_time(records: list[dict]) -> list[dict]:
    """Adds ``train/time_s``: the time of decomposition + intermediate + downstream training."""
    for rec in records:
        m = rec["metrics"]
        m["train/time_s"] = sum(m.get(f"{stage}/time_s", 0.0) for stage in TIMED_STAGES)
    return records


def fmt_count(value: tuple[float, float] | None) -> str:
    """A parameter count (the same for every seed) as a plain integer."""
    return "-" if value is None else f"{round(value[0]):,}"


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    stage_metrics = [f"{stage}/test_{m}" for stage in ("after_decompose", "after_pretrain")
                     for m in ("acc", "ppl")]
    groups = aggregate(records, ["model.name", "dataset.name", "row", "method.ratio"],
                       ["params/compressed", "val/acc", "val/ppl", "test/acc", "test/ppl",
                        "train/time_s",
                        *stage_metrics])
    by_key = {(g["model.name"], g["row"], g["method.ratio"]): g for g in groups}
    header = ["model / data", "ratio", "row", "seeds", "parameters", "val acc or ppl",
              "test acc or ppl",
              "train time (s)", "before training", "after intermediate"]
    rows, curves = [], {}
    settings = sorted({(g["model.name"], g["dataset.name"]) for g in groups}, reverse=True)
    for model, dataset in settings:
        ratios = sorted({r for (m, row, r) in by_key if m == model and row != "dense"})
        dense = next((g for (m, row, _), g in by_key.items() if m == model and row == "dense"),
                     None)
        name = METRIC.get(dataset, "acc")
        metric = f"test/{name}"
        for ratio in ratios:
            for row, label in ROW_LABELS.items():
                g = dense if row == "dense" else by_key.get((model, row, ratio))
                if g is None:
                    continue
                rows.append([f"{model} / {dataset}", ratio, label, g["n"],
                             fmt_count(g["params/compressed"]),
                             fmt_mean_std(g[f"val/{name}"]), fmt_mean_std(g[metric]),
                             fmt_mean_std(g["train/time_s"], 3),
                             fmt_mean_std(g[f"after_decompose/test_{name}"]),
                             fmt_mean_std(g[f"after_pretrain/test_{name}"])])
                if dataset == "digits" and g[metric] is not None:
                    xs, ys = curves.setdefault(label, ([], []))
                    xs.append(ratio)
                    ys.append(g[metric][0])
    return header, rows, curves


def main() -> None:
    from compresslab.report import markdown_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the sweep folder (sweep.py --out)")
    parser.add_argument("--tables", default="outputs/tables")
    args = parser.parse_args()
    records = with_train_time(collect_runs(args.runs))
    if not records:
        raise SystemExit(f"error: no finished runs below {args.runs}")
    header, rows, curves = table_rows(records)
    out = Path(args.tables)
    out.mkdir(parents=True, exist_ok=True)
    text = ("# PELA ablation\n\nEach row is followed by the same downstream fine-tuning. "
            f"Runs: `{args.runs}` (W&B group `pela`).\n\n" + markdown_table(header, rows))
    (out / "pela.md").write_text(text)
    if curves:
        line_plot(curves, out / "pela.png", xlabel="ratio (fraction of layer weights removed)",
                  ylabel="test accuracy (mean over seeds)", title="PELA ablation, vit_tiny/digits")
    print(text)


if __name__ == "__main__":
    main()
