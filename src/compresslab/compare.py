"""Compare finished runs offline: ``python -m compresslab.compare <run or sweep folders>
--by method.name,method.ratio``.

Collects every finished run below the folders (``metrics.json`` + ``.hydra/config.yaml``,
see :func:`compresslab.report.collect_runs`), groups them by any config keys, aggregates
the rest (typically seeds) as mean +- sample std, and writes ``compare.md`` and
``compare.png`` (first metric against the first numeric ``--by`` key, one line per value
of the others). A finished Hydra multirun does the same by itself (:class:`MultirunTable`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from compresslab.errors import ConfigError
from compresslab.report import (
    aggregate,
    collect_runs,
    fmt_mean_std,
    line_plot,
    lookup,
    markdown_table,
)

#: config groups chosen on the command line (``method=svd``) are compared by their name
GROUP_NAME_KEYS = ("method", "model", "dataset", "trainer", "logger")


def group_key(key: str) -> str:
    return f"{key}.name" if key in GROUP_NAME_KEYS else key


def default_metrics(records: list[dict[str, Any]]) -> list[str]:
    """Each run's objective, ``test/<dataset.metric>`` (the saved config keeps the
    ``objective`` key unresolved), and the achieved parameter reduction."""
    objectives = [f"test/{lookup(r, 'dataset.metric') or 'loss'}" for r in records]
    found = [m for m in dict.fromkeys(objectives) if any(m in r["metrics"] for r in records)]
    return [*found, "params/ratio"]


def compare(folders: list[str | Path], by: list[str], metrics: list[str] | None = None,
            out: str | Path | None = None, title: str = "") -> tuple[str, Path | None]:
    """Markdown table of the runs below ``folders`` grouped by ``by`` (written to
    ``<out>/compare.md``) and its PNG; returns (markdown, png path or None)."""
    records = collect(folders)
    by = [group_key(k) for k in by]
    missing = [k for k in by if all(lookup(r, k) is None for r in records)]
    if missing:
        raise ConfigError(f"--by: no run has config key(s) {', '.join(missing)}")
    metrics = metrics or default_metrics(records)
    rows = aggregate(records, by, metrics)
    rows.sort(key=lambda row: tuple(sortable(row[k]) for k in by))
    header = [*by, "runs", *metrics]
    text = markdown_table(header, [[*(row[k] for k in by), row["n"],
                                    *(fmt_mean_std(row[m]) for m in metrics)] for row in rows])
    out = Path(out or folders[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text((f"# {title}\n\n" if title else "") + text)
    return text, plot(rows, by, metrics[0], out / "compare.png")


def collect(folders: list[str | Path]) -> list[dict[str, Any]]:
    records = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"not a folder: {folder}")
        records += collect_runs(folder)
    if not records:
        raise ConfigError(f"no finished run (metrics.json) below {', '.join(map(str, folders))}")
    return records


def sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def plot(rows: list[dict[str, Any]], by: list[str], metric: str, path: Path) -> Path | None:
    """``metric`` against the first numeric ``by`` key, one line per value of the others;
    None when no key is numeric."""
    numeric = [k for k in by if all(isinstance(row[k], int | float) for row in rows)]
    if not numeric:
        return None
    x, others = numeric[0], [k for k in by if k != numeric[0]]
    series: dict[str, tuple[list, list]] = {}
    for row in sorted(rows, key=lambda r: r[x]):
        if row[metric] is None:
            continue
        label = ", ".join(f"{k}={row[k]}" for k in others) or metric
        xs, ys = series.setdefault(label, ([], []))
        xs.append(row[x])
        ys.append(row[metric][0])
    if not series:
        return None
    return line_plot(series, path, xlabel=x, ylabel=metric, title=f"{metric} (mean of seeds)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compresslab.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="run folders or sweep folders")
    parser.add_argument("--by", default="method.name,method.ratio",
                        help="comma-separated config keys to group by (default: %(default)s)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metrics (default: the objective, params/ratio)")
    parser.add_argument("--out", default=None, help="folder for compare.md/.png "
                                                    "(default: the first folder)")
    args = parser.parse_args(argv)
    try:
        text, png = compare(args.folders, split_list(args.by),
                            split_list(args.metrics) if args.metrics else None, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"written: {Path(args.out or args.folders[0]) / 'compare.md'}"
          + (f", {png}" if png else ""))
    return 0


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# -- a finished Hydra multirun prints one combined table -------------------------------------

def swept_keys(task_overrides: list[str]) -> list[str]:
    """The keys a multirun varies (``a=1,2``, ``a=range(..)``, ``a=choice(..)``), seed last
    out (seeds are what the table averages over)."""
    keys = []
    for item in task_overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key != "seed" and ("," in value or value.startswith(("range(", "choice(", "glob("))):
            keys.append(key)
    return keys


def _hydra_callback_base():
    from hydra.experimental.callback import Callback

    return Callback


class MultirunTable(_hydra_callback_base()):
    """Hydra callback: at the end of a multirun, print and write (``compare.md``/``.png``
    in the sweep folder) one table over all its jobs, grouped by the swept keys."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        by = swept_keys(list(config.hydra.overrides.task)) or ["method.name"]
        try:
            text, png = compare([sweep_dir], by, title=f"multirun {sweep_dir.name}")
        except ConfigError as exc:  # e.g. every job failed: nothing to tabulate
            print(f"no combined table: {exc}")
            return
        print(f"\nall runs of {sweep_dir} (mean ± std over seeds):\n{text}"
              f"written: {sweep_dir / 'compare.md'}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
