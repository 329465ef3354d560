"""PELA ablation table: rows dense | LRA | LRA+fine-tune | LRA+FD | LRA+FD+WPR per model and
ratio; columns parameters, val and test accuracy or perplexity after the downstream
fine-tuning (mean ± std over base models), training time, and the same metric before any
training (val and test: the table's ratios are chosen on val) and after the intermediate
stage (test).

    python experiments/pela/table.py --runs outputs/pela_runs/<stamp>

Writes ``<tables>/pela.md`` and ``<tables>/pela.png`` (ViT accuracy against ratio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compresslab.report import (
    BOLD_RULE,
    aggregate,
    bold_verdict,
    collect_runs,
    fmt_mean_std,
    fmt_seeded,
    line_plot,
    seeded_cells,
    verdict_note,
)

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


def quality_cells(records: list[dict], split: str) -> dict[tuple, object]:
    """(model, row, ratio) -> seeded cell of the split's acc or ppl (the dense row under
    ratio None: its ratio does nothing)."""
    cells = {}
    for name in ("acc", "ppl"):
        for (model, row, ratio), cell in seeded_cells(
                records, ["model.name", "row", "method.ratio"], f"{split}/{name}").items():
            cells[(model, row, None if row == "dense" else ratio)] = cell
    return cells


def verdicts(records: list[dict]) -> dict[tuple[str, float], object]:
    """(model, ratio) -> the bold rule over the decomposed rows' test metric."""
    cells = quality_cells(records, "test")
    higher = {m: METRIC.get(d, "acc") == "acc" for m, d in models_of(records)}
    out = {}
    for model, ratio in sorted({(m, r) for m, _, r in cells if r is not None}):
        row = {row: c for (m, row, r), c in cells.items() if m == model and r == ratio}
        out[(model, ratio)] = bold_verdict(row, lower_is_better=not higher[model])
    return out


def models_of(records: list[dict]) -> set[tuple[str, str]]:
    return {(r["cfg"]["model"]["name"], r["cfg"]["dataset"]["name"]) for r in records}


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    stage_metrics = [f"{stage}/{split}_{m}" for stage in ("after_decompose", "after_pretrain")
                     for split in ("val", "test") for m in ("acc", "ppl")]
    groups = aggregate(records, ["model.name", "dataset.name", "row", "method.ratio"],
                       ["params/compressed", "val/acc", "val/ppl", "test/acc", "test/ppl",
                        "train/time_s",
                        *stage_metrics])
    by_key = {(g["model.name"], g["row"], g["method.ratio"]): g for g in groups}
    val_cells, test_cells = quality_cells(records, "val"), quality_cells(records, "test")
    bold = verdicts(records)
    header = ["model / data", "ratio", "row", "runs", "base models", "parameters",
              "val acc or ppl",
              "test acc or ppl",
              "train time (s)", "before training (val)", "before training (test)",
              "after intermediate (test)"]
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
                key = (model, row, None if row == "dense" else ratio)
                verdict = bold.get((model, ratio))
                is_bold = bool(verdict and verdict.bold and verdict.best == row)
                test = test_cells.get(key)
                rows.append([f"{model} / {dataset}", ratio, label, g["n"],
                             test.n if test else 0, fmt_count(g["params/compressed"]),
                             fmt_seeded(val_cells.get(key)), fmt_seeded(test, is_bold),
                             fmt_mean_std(g["train/time_s"], 3),
                             fmt_mean_std(g[f"after_decompose/val_{name}"]),
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
    parser.add_argument("--runs", required=True, help="the grid's folder (grid --out)")
    parser.add_argument("--tables", default="outputs/tables")
    args = parser.parse_args()
    records = with_train_time(collect_runs(args.runs))
    if not records:
        raise SystemExit(f"error: no finished runs below {args.runs}")
    header, rows, curves = table_rows(records)
    out = Path(args.tables)
    out.mkdir(parents=True, exist_ok=True)
    notes = [verdict_note(f"{model} at ratio {ratio}", v, lambda r: ROW_LABELS.get(r, r))
             for (model, ratio), v in verdicts(records).items()]
    text = ("# PELA ablation\n\nEach row is followed by the same downstream fine-tuning. "
            f"Runs: `{args.runs}` (W&B group `pela`). runs: the runs behind a cell (base "
            f"models x run seeds). {BOLD_RULE} Only the decomposed rows compete (dense is "
            "the reference).\n\n" + markdown_table(header, rows)
            + "\nBold rule per model and ratio (test):\n\n" + "\n".join(notes) + "\n")
    (out / "pela.md").write_text(text)
    if curves:
        line_plot(curves, out / "pela.png", xlabel="ratio (fraction of layer weights removed)",
                  ylabel="test accuracy (mean over seeds)", title="PELA ablation, vit_tiny/digits")
    print(text)


if __name__ == "__main__":
    main()
