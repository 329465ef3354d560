"""Results -> tables (terminal, markdown) and figures."""

from __future__ import annotations

from typing import Any

from compresslab.tasks import Task


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.{digits}g}"
    return str(value)


def run_table_rows(metrics: dict[str, Any], task: Task) -> list[tuple[str, str, str]]:
    """(quantity, dense, compressed) rows for one run's metrics."""
    rows = []
    splits = sorted({k.split("/")[0] for k in metrics if k.startswith(("val/", "test/"))})
    for split in splits:
        for name in (task.primary_metric, "loss"):
            key = f"{split}/{name}"
            if key in metrics:
                rows.append((f"{split} {name}", fmt(metrics.get(f"dense/{split}_{name}", "-")),
                             fmt(metrics[key])))
    rows.append(("parameters", fmt(metrics.get("params/dense", "-")),
                 fmt(metrics.get("params/compressed", "-"))))
    for key in sorted(k for k in metrics if k.endswith("/params_ratio")):
        rows.append((f"{key} (achieved)", "", fmt(metrics[key])))
    return rows


def print_run_table(metrics: dict[str, Any], task: Task) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dense vs compressed")
    for col in ("", "dense", "compressed"):
        table.add_column(col, justify="right" if col else "left")
    for row in run_table_rows(metrics, task):
        table.add_row(*row)
    Console().print(table)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
