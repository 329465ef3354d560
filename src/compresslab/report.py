"""Results -> tables (terminal, markdown) and figures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresslab.tasks import Task


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{max(digits - 1, 0)}e}"  # the same significant digits
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


# -- many runs -> one table ------------------------------------------------------------------

def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run below ``sweep_dir``: its metrics plus its resolved config.

    Each record holds ``metrics`` (metrics.json), ``cfg`` (the run's resolved
    config as a dict, from ``.hydra/config.yaml``) and ``dir``. Runs without
    ``metrics.json`` (failed or unfinished) are skipped.
    """
    from omegaconf import OmegaConf

    records = []
    for metrics_file in sorted(Path(sweep_dir).rglob("metrics.json")):
        run_dir = metrics_file.parent
        cfg_file = run_dir / ".hydra" / "config.yaml"
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_file)) if cfg_file.is_file() else {}
        records.append({"dir": str(run_dir), "cfg": cfg,
                        "metrics": json.loads(metrics_file.read_text())})
    return records


def lookup(record: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``cfg.a.b`` or ``metrics[...]`` of a record: dotted keys read the config,
    keys containing a slash read the metrics."""
    if "/" in dotted:
        return record["metrics"].get(dotted, default)
    node: Any = record["cfg"]
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); ``statistics`` computes
    exactly, so equal values give a std of exactly 0 (no rounding residue)."""
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: list[dict[str, Any]], by: list[str],
              metrics: list[str]) -> list[dict[str, Any]]:
    """Group records by the ``by`` keys; per metric: mean, std and count over the group
    (typically over seeds). Returns one dict per group, in first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(tuple(lookup(rec, k) for k in by), []).append(rec)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = len(members)
        for m in metrics:
            values = [lookup(r, m) for r in members if lookup(r, m) is not None]
            row[m] = mean_std(values) if values else None
        rows.append(row)
    return rows


def fmt_mean_std(value: tuple[float, float] | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    mean, std = value
    return fmt(mean, digits) if std == 0 else f"{fmt(mean, digits)} ± {fmt(std, 2)}"


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, *,
              xlabel: str, ylabel: str, title: str = "", logy: bool = False,
              logx: bool = False) -> Path:
    """One line per label: ``series[label] = (xs, ys)``; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        # past the 10 colours of the cycle, the line style and marker tell lines apart
        ax.plot(xs, ys, marker="osD^"[i // 10 % 4], ls=("-", "--", ":", "-.")[i // 10 % 4],
                lw=1.5, label=label)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure (only in the
    main process of a run with several)."""
    import matplotlib.pyplot as plt

    from compresslab.distributed import is_main_process

    path = Path(path)
    if not is_main_process():
        plt.close(fig)
        return path
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# -- seeded cells: mean ± std over base models, and when a lead is real ----------------------

#: the base model's seed: the paper tables' cells are compared paired by it
BASE_SEED_KEY = "model.pretrain.seed"
#: one-sided significance level of the paired t-test behind a bold cell
BOLD_ALPHA = 0.05
BOLD_RULE = ("Cells: mean ± sample std over base models (`model.pretrain.seed`; runs of one "
             "base model with several calibration or run seeds are averaged first). **Bold**: "
             "the best mean of the row, only where its lead holds beyond the spread: paired "
             "by base model, it beats the runner-up on every base model and a one-sided paired "
             f"t-test over base models gives p < {BOLD_ALPHA}; a row with one base model is "
             "never bold.")


@dataclass
class SeededCell:
    """One table cell over base models: ``values[base seed]`` (each the mean over that base's
    calibration or run seeds), their mean and sample std, ``runs`` the runs behind it."""

    values: dict[Any, float]
    runs: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean_std(list(self.values.values()))[0]

    @property
    def std(self) -> float:
        return mean_std(list(self.values.values()))[1]


def seeded_cells(records: list[dict[str, Any]], by: list[str], metric: str,
                 seed_key: str = BASE_SEED_KEY) -> dict[tuple, SeededCell]:
    """Cells keyed by the ``by`` values, each holding ``metric`` per base seed (``seed_key``;
    a run without it counts as seed 0): the runs of one base seed (other calibration or
    run seeds) are averaged first, so that the cell is paired by base model."""
    per_seed: dict[tuple, dict[Any, list[float]]] = {}
    for rec in records:
        value = lookup(rec, metric)
        if value is None:
            continue
        key = tuple(lookup(rec, k) for k in by)
        per_seed.setdefault(key, {}).setdefault(lookup(rec, seed_key, 0), []).append(
            float(value))
    return {key: SeededCell({s: mean_std(v)[0] for s, v in sorted(seeds.items(),
                                                                     key=lambda kv: str(kv[0]))},
                            sum(len(v) for v in seeds.values()))
            for key, seeds in per_seed.items()}


@dataclass
class Verdict:
    """Which entry of a row is bold (None: none) and why."""

    best: str | None            # the best mean (bold only if ``bold``)
    runner_up: str | None
    bold: bool
    p_value: float | None       # one-sided paired t-test, best vs runner-up
    reason: str


def bold_verdict(row: dict[str, SeededCell], lower_is_better: bool,
                 alpha: float = BOLD_ALPHA) -> Verdict:
    """The bold rule over one row's cells (name -> cell): the best mean is bold only when,
    paired by base seed with the runner-up, it is better on every shared seed and the
    one-sided paired t-test gives p < ``alpha``; fewer than two shared seeds: never bold."""
    ranked = sorted(row, key=lambda name: row[name].mean, reverse=not lower_is_better)
    if not ranked:
        return Verdict(None, None, False, None, "no runs")
    best = ranked[0]
    if len(ranked) == 1:
        return Verdict(best, None, False, None, "nothing to compare with")
    second = ranked[1]
    seeds = [s for s in row[best].values if s in row[second].values]
    if len(seeds) < 2:
        return Verdict(best, second, False, None,
                       f"{best} vs {second}: {len(seeds)} shared base model(s)")
    a = [row[best].values[s] for s in seeds]
    b = [row[second].values[s] for s in seeds]
    wins = sum((x < y) if lower_is_better else (x > y) for x, y in zip(a, b))
    p = paired_p_value(a, b, lower_is_better)
    bold = wins == len(seeds) and p < alpha
    reason = (f"{best} vs {second}: better on {wins}/{len(seeds)} base models, "
              f"one-sided paired t-test p = {p:.3g}")
    return Verdict(best, second, bold, p, reason)


def paired_p_value(a: list[float], b: list[float], lower_is_better: bool) -> float:
    """One-sided paired t-test that ``a`` is better than ``b`` (scipy.stats.ttest_rel).
    Differences that are all equal have no spread: p is 0 if they favour ``a``, else 1."""
    from scipy.stats import ttest_rel

    diffs = [x - y for x, y in zip(a, b)]
    if max(diffs) == min(diffs):
        favours = diffs[0] < 0 if lower_is_better else diffs[0] > 0
        return 0.0 if favours else 1.0
    result = ttest_rel(a, b, alternative="less" if lower_is_better else "greater")
    return float(result.pvalue)


def fmt_seeded(cell: SeededCell | None, bold: bool = False, digits: int = 4) -> str:
    """``mean ± std`` (one base model: the value alone), in bold when ``bold``; '-' if None."""
    if cell is None:
        return "-"
    text = fmt(cell.mean, digits) if cell.n == 1 else (
        f"{fmt(cell.mean, digits)} ± {fmt(cell.std, 2)}")
    return f"**{text}**" if bold else text


def verdict_note(where: str, verdict: Verdict, label=str) -> str:
    """One line under a seeded table: which cell of row ``where`` is bold and why."""
    head = f"**{label(verdict.best)}** bold" if verdict.bold else "no bold cell"
    return f"- {where}: {head} ({verdict.reason})"
