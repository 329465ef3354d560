"""Checks of the top-level options (``seed``, ``threads``, ``checkpoint_every``,
``run_name``, the switches), made before any work, like the method options.

``run_name`` is also checked on the command line, before Hydra makes the run folder from
it: a name with a path separator would put the run in another folder, ``..`` outside
``paths.root``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from compresslab.errors import ConfigError

SEED_MAX = 2**32 - 1          # numpy's and Lightning's seeds are 32-bit
RUN_NAME_MAX = 200            # leaves room under the usual 255-byte file name limit
SWITCHES = ("progress", "save_model", "print_table", "eval.dense")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None,
              allow_null: bool = False) -> None:
    if value is None and allow_null:
        return
    if not _is_int(value) or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        null = " or null" if allow_null else ""
        raise ConfigError(f"{name} must be an integer {span}{null}, got {value!r}")


def check_run_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"run_name must be a non-empty text, got {name!r}")
    if len(name) > RUN_NAME_MAX:
        raise ConfigError(f"run_name is {len(name)} characters long; at most {RUN_NAME_MAX}")
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if bad or name in (".", ".."):
        raise ConfigError(f"run_name {name!r} must be a plain folder name (no / or \\, "
                          f"not . or ..): it names a folder below paths.root")


def check_top_level(cfg: DictConfig) -> None:
    check_int("seed", cfg.get("seed"), 0, SEED_MAX)
    check_int("threads", cfg.get("threads"), 1, allow_null=True)
    check_int("checkpoint_every", cfg.get("checkpoint_every"), 0, allow_null=True)
    check_run_name(cfg.get("run_name"))
    for key in SWITCHES:
        value = OmegaConf.select(cfg, key, default=True)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")


def check_command_line(argv: list[str]) -> None:
    """``run_name=...`` given on the command line, and the folder the run will write below
    (``hydra.run.dir``, else ``paths.root``), checked before Hydra uses them."""
    values = {a.split("=", 1)[0]: a.split("=", 1)[1].strip("'\"") for a in argv if "=" in a}
    if "run_name" in values:
        check_run_name(values["run_name"])
    if not any(a in ("-m", "--multirun") for a in argv):
        check_writable(values.get("hydra.run.dir") or values.get("paths.root") or "outputs")


def check_writable(folder: str) -> None:
    """The nearest existing folder at or above ``folder`` takes new files (access(2) says
    so for a read-only file system even to root)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write below {path} (read-only or not yours); choose "
                          f"another hydra.run.dir or paths.root")
