"""One runner for every paper table: a declarative grid of runs, swept, resumed, grouped.

    python -m compresslab.grid experiments/numprune/grid.yaml --out outputs/numprune_runs/main \\
        [--variant quick] [--settings llama_tiny] [--rows numerical,wanda] [--ratios 0.3,0.5] \\
        [--base-seeds 0,1,2] [--calib-seeds 0] [--seeds 0] [--dry-run] [-- extra overrides]

A grid file (``experiments/<paper>/grid.yaml``) declares, and nothing else is needed:

* ``experiment`` (the ``configs/experiment/`` preset every run gets), ``group`` (W&B group),
  ``row_key`` (the config key that names the table row, e.g. ``variant``; null: none) and
  ``common`` (overrides of every run);
* ``settings``: name -> overrides (or ``{overrides: [...], rows: [...], axes: {ratio:
  {values: [...]}}}`` to restrict its rows or give it its own axis values);
* ``rows``: name -> ``{overrides: [...], axes: {...}, optional: true}`` (``optional``: only
  when ``--rows`` names it); extra keys (``label``, ``family``) are for the table script;
* ``axes``: name -> ``{key: <config key>, prefix: <folder letter>, values: [...]}``, e.g.
  ``ratio``, ``base_seed`` (``model.pretrain.seed``), ``calib_seed``, ``seed``; a row's
  ``axes`` entry replaces fields of one axis or drops it (``null``: the dense row has no ratio);
* ``variants``: name -> top-level keys that replace the grid's (``rows`` entries merge per
  row), e.g. ``quick``.

Every cell (setting x row x axis values) is one run in ``<out>/<setting>/<row>/<cell>``
(``<cell>``: ``r0.3-b1-c0``; a row without axes: ``<out>/<setting>/<row>``). A cell whose
folder holds ``metrics.json`` is finished and skipped, an interrupted one continues in its
folder (``run.py`` resumes it), so running again resumes the grid. The missing cells of one
(setting, row) are one ``run.py -m`` multirun when they form a full product, else one per
combination of the axes other than the ratio. Extra overrides after ``--`` go to every run
(before the row's own, so that a row may switch a stage off after them). A failed multirun is
reported and the others go on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compresslab.errors import ConfigError

#: command-line flag -> the axis it sets
AXIS_FLAGS = {"ratios": "ratio", "base_seeds": "base_seed", "calib_seeds": "calib_seed",
              "seeds": "seed"}


def repo_root() -> Path:
    """The checkout holding ``run.py`` (editable install) or else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "run.py").is_file() else Path.cwd()


# -- the grid file ----------------------------------------------------------------------------

def load_grid(path: str | Path, variant: str | None = None) -> dict[str, Any]:
    """The grid of ``path`` with ``variant``'s keys applied, checked."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} not found")
    grid = OmegaConf.to_container(OmegaConf.load(path))
    variants = grid.pop("variants", None) or {}
    if variant is not None:
        if variant not in variants:
            raise ConfigError(f"grid {path}: unknown variant {variant!r} "
                              f"(known: {', '.join(variants) or 'none'})")
        grid = apply_variant(grid, variants[variant])
    grid["variant"] = variant
    grid["settings"] = {name: normalized_setting(s) for name, s in grid["settings"].items()}
    for name, row in grid["rows"].items():
        grid["rows"][name] = {"overrides": [], **(row or {})}
    for key in ("experiment", "settings", "rows"):
        if not grid.get(key):
            raise ConfigError(f"grid {path}: '{key}' is missing or empty")
    return grid


def apply_variant(grid: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys replace the grid's; ``rows`` entries replace fields of their row."""
    out = {**grid, **{k: v for k, v in changes.items() if k != "rows"}}
    rows = {name: dict(row or {}) for name, row in grid["rows"].items()}
    for name, row in (changes.get("rows") or {}).items():
        rows[name] = {**rows.get(name, {}), **(row or {})}
    out["rows"] = rows
    return out


def normalized_setting(setting: list | dict | None) -> dict[str, Any]:
    if isinstance(setting, dict):
        return {"overrides": list(setting.get("overrides") or []), "rows": setting.get("rows"),
                "axes": setting.get("axes") or {}}
    return {"overrides": list(setting or []), "rows": None, "axes": {}}


def row_axes(grid: dict[str, Any], row: str) -> dict[str, dict[str, Any]]:
    """The axes of ``row``: the grid's, with the row's replacements (null drops one)."""
    axes = {name: dict(spec) for name, spec in (grid.get("axes") or {}).items()}
    for name, spec in (grid["rows"][row].get("axes") or {}).items():
        if spec is None:
            axes.pop(name, None)
        else:
            axes[name] = {**axes.get(name, {}), **spec}
    return axes


def chosen(names: list[str] | None, known: dict, what: str, default: list[str]) -> list[str]:
    if names is None:
        return default
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown {what} {', '.join(unknown)} (known: {', '.join(known)})")
    return names


# -- cells and commands -----------------------------------------------------------------------

@dataclass
class Cell:
    """One run of the grid: its folder and the overrides that make it."""

    setting: str
    row: str
    values: dict[str, Any] = field(default_factory=dict)   # axis -> value
    folder: Path = Path()

    def finished(self) -> bool:
        return (self.folder / "metrics.json").is_file()


def cell_name(axes: dict[str, dict[str, Any]], values: dict[str, Any]) -> str:
    return "-".join(f"{axes[a].get('prefix', a)}{values[a]}" for a in axes)


def cells(grid: dict[str, Any], out: Path, settings: list[str] | None = None,
          rows: list[str] | None = None, values: dict[str, list] | None = None) -> list[Cell]:
    """Every cell of the grid (``values``: axis -> values replacing the grid's)."""
    values = values or {}
    known_axes = set(grid.get("axes") or {})
    for axis in values:
        if axis not in known_axes:
            raise ConfigError(f"this grid has no axis {axis!r} (axes: "
                              f"{', '.join(sorted(known_axes)) or 'none'})")
    settings = chosen(settings, grid["settings"], "settings", list(grid["settings"]))
    rows = chosen(rows, grid["rows"], "rows",
                  [r for r, spec in grid["rows"].items() if not spec.get("optional")])
    todo = []
    for setting in settings:
        allowed = grid["settings"][setting]["rows"]
        for row in rows:
            if allowed is not None and row not in allowed:
                continue
            axes = row_axes(grid, row)
            own = grid["settings"][setting]["axes"]     # a setting's own axis values
            lists = [values.get(a, (own.get(a) or axes[a]).get("values") or []) for a in axes]
            for combo in itertools.product(*lists):
                point = dict(zip(axes, combo))
                folder = out / setting / row
                name = cell_name(axes, point)
                todo.append(Cell(setting, row, point, folder / name if name else folder))
    return todo


def base_overrides(grid: dict[str, Any], setting: str, row: str, extra: list[str]) -> list[str]:
    """Everything but the axes: experiment, group, row name, setting, common, extra, row."""
    names = [f"experiment={grid['experiment']}"]
    if grid.get("group"):
        names.append(f"group={grid['group']}")
    if grid.get("row_key"):
        names.append(f"{grid['row_key']}={row}")
    return [*names, *grid["settings"][setting]["overrides"], *(grid.get("common") or []),
            *extra, *grid["rows"][row]["overrides"]]


def commands(grid: dict[str, Any], todo: list[Cell], extra: list[str] | None = None,
             python: str = sys.executable, repo: Path | None = None) -> list[list[str]]:
    """``run.py`` command lines for the unfinished ``todo`` cells: per (setting, row) one
    multirun over the missing cells when they form a full product, else one per combination
    of the non-ratio axes."""
    repo = repo or repo_root()
    by_row: dict[tuple[str, str], list[Cell]] = {}
    for cell in todo:
        if not cell.finished():
            by_row.setdefault((cell.setting, cell.row), []).append(cell)
    cmds = []
    for (setting, row), missing in by_row.items():
        axes = row_axes(grid, row)
        base = [python, str(repo / "run.py"), *base_overrides(grid, setting, row, extra or [])]
        for part in product_parts(missing, list(axes)):
            cmds.append(command(base, axes, part, missing[0].folder if not axes
                                else missing[0].folder.parent))
    return cmds


def product_parts(missing: list[Cell], axes: list[str]) -> list[list[Cell]]:
    """``missing`` as one part if it is the full product of its axis values, else split by
    the axes other than the ratio (each part then a product over the ratios)."""
    def is_product(part: list[Cell]) -> bool:
        sizes = [len({str(c.values[a]) for c in part}) for a in axes]
        total = 1
        for n in sizes:
            total *= n
        return total == len(part)

    if is_product(missing):
        return [missing]
    groups: dict[tuple, list[Cell]] = {}
    for cell in missing:
        groups.setdefault(tuple(str(cell.values[a]) for a in axes if a != "ratio"),
                          []).append(cell)
    return list(groups.values())


def command(base: list[str], axes: dict[str, dict[str, Any]], part: list[Cell],
            folder: Path) -> list[str]:
    if not axes:      # a single run in its own folder
        return [*base, f"hydra.run.dir={folder}"]
    swept = []
    for axis, spec in axes.items():
        seen = list(dict.fromkeys(str(c.values[axis]) for c in part))
        swept.append(f"{spec['key']}={','.join(seen)}")
    subdir = "-".join(f"{spec.get('prefix', a)}${{{spec['key']}}}" for a, spec in axes.items())
    return [base[0], base[1], "-m", *base[2:], *swept, f"hydra.sweep.dir={folder}",
            f"hydra.sweep.subdir={subdir}"]


# -- running ----------------------------------------------------------------------------------

def run_grid(grid: dict[str, Any], out: Path, *, settings: list[str] | None = None,
             rows: list[str] | None = None, values: dict[str, list] | None = None,
             extra: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Run every unfinished cell; returns the commands that failed (dry run: none run)."""
    todo = cells(grid, out, settings, rows, values)
    done = [c for c in todo if c.finished()]
    for cell in done:
        print(f"= {cell.folder} already finished", flush=True)
    cmds = commands(grid, todo, extra)
    print(f"grid {grid.get('group') or grid['experiment']}: {len(todo)} cells, {len(done)} "
          f"finished, {len(cmds)} command(s) to run", flush=True)
    env = {**os.environ, "WANDB_SILENT": "true"}
    failed = []
    for cmd in cmds:
        print("+", " ".join(cmd[1:]), flush=True)
        if dry_run:
            continue
        if subprocess.run(cmd, cwd=repo_root(), env=env).returncode != 0:
            failed.append(" ".join(cmd[2:]))    # the other rows still run
    return failed


def parse_values(text: str | None) -> list[Any] | None:
    """``"0.3,0.5"`` -> [0.3, 0.5]; ``"0,1"`` -> [0, 1] (as YAML reads them)."""
    import yaml

    return None if text is None else [yaml.safe_load(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compresslab.grid",
                                     description=__doc__.splitlines()[0],
                                     epilog="overrides after -- go to every run")
    parser.add_argument("grid", help="the grid file (experiments/<paper>/grid.yaml)")
    parser.add_argument("--out", required=True, help="folder of the grid's runs")
    parser.add_argument("--variant", help="a variant of the grid file (e.g. quick)")
    parser.add_argument("--settings", help="comma-separated settings (default: all)")
    parser.add_argument("--rows", help="comma-separated rows (default: all not optional)")
    for flag, axis in AXIS_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}",
                            help=f"comma-separated values of the {axis} axis")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]          # overrides for every run
    try:
        grid = load_grid(args.grid, args.variant)
        values = {axis: parse_values(getattr(args, flag)) for flag, axis in AXIS_FLAGS.items()
                  if getattr(args, flag) is not None}
        failed = run_grid(grid, Path(args.out),
                          settings=args.settings.split(",") if args.settings else None,
                          rows=args.rows.split(",") if args.rows else None, values=values,
                          extra=args.extra, dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print("error: these runs failed (the others finished):\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
