"""Run the leaderboard: every row of every setting at every budget (leaderboard.yaml).

    python experiments/leaderboard/sweep.py --out outputs/leaderboard_runs/main [--quick]

Runs go to ``<out>/<setting>/<row>/r<budget>`` (the dense reference: ``<out>/<setting>/
dense``), one after another in this process (``experiment=leaderboard``: W&B group
``leaderboard``). A finished run (``metrics.json``) is skipped and an interrupted one is
continued, so running again resumes. A run that fails is reported and the others go on;
the table marks it missing. Extra arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("leaderboard.yaml")


def load_plan(quick: bool) -> dict:
    """The leaderboard's settings (``quick``: the smoke variant's budgets, steps, settings)."""
    from omegaconf import OmegaConf

    plan = OmegaConf.to_container(OmegaConf.load(CONFIG))
    if quick:
        plan.update(plan.pop("quick"))
    else:
        plan.pop("quick")
    return plan


def row_overrides(plan: dict, row: str) -> list[str]:
    steps = int(plan["recovery_steps"])
    return [o.format(steps=steps, half=steps // 2) for o in plan["rows"][row]["overrides"]]


def jobs(plan: dict, out: Path, extra: list[str]) -> list[tuple[Path, list[str]]]:
    """(run folder, overrides) of every run: per setting the dense reference, then each row
    at each budget."""
    todo = []
    for name, setting in plan["settings"].items():
        base = ["experiment=leaderboard", *setting["overrides"], "print_table=false",
                "progress=false", "threads=1"]   # tiny models: 1 thread is faster, steadier
        if setting.get("zero_shot"):
            base.append(f"eval.lm_eval.tasks=[{','.join(setting['zero_shot'])}]")
        todo.append((out / name / "dense", [*base, "method=none", "variant=dense", *extra]))
        for row in setting["rows"]:
            for budget in plan["budgets"]:
                todo.append((out / name / row / f"r{budget}",
                             [*base, *row_overrides(plan, row), f"variant={row}",
                              f"method.ratio={budget}", "eval.dense=false", *extra]))
    return todo


def run_one(run_dir: Path, overrides: list[str]) -> None:
    """One run in this process, its resolved config written as ``.hydra/config.yaml`` (what
    :func:`compresslab.report.collect_runs` reads) once it finished."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import compresslab  # noqa: F401  (resolvers)
    from compresslab.pipeline import run

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"run_dir={run_dir}"])
    run(cfg)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def sweep(out: Path, plan: dict, extra: list[str] | None = None) -> list[str]:
    """Every run of ``plan`` not finished yet; returns the folders of the runs that failed."""
    failed = []
    for run_dir, overrides in jobs(plan, out, list(extra or [])):
        if (run_dir / "metrics.json").is_file():
            print(f"= {run_dir} already finished", flush=True)
            continue
        print(f"+ {run_dir}: {' '.join(overrides)}", flush=True)
        try:
            run_one(run_dir, overrides)
        except Exception as exc:  # noqa: BLE001  (one failed row must not stop the board)
            logging.getLogger(__name__).debug(traceback.format_exc())
            print(f"! {run_dir} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                  flush=True)
            failed.append(str(run_dir))
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the leaderboard's runs")
    parser.add_argument("--quick", action="store_true", help="the smoke variant")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run")
    args = parser.parse_args(argv)
    failed = sweep(Path(args.out), load_plan(args.quick), args.extra)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
