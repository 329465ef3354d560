"""Run the PEFT table: one Hydra multirun per row over the seeds.

    python experiments/peft/sweep.py --out outputs/peft_runs/<name>

Rows: lora and pissa at ranks 1, 2, 4, lokr, and soka at energy thresholds 0.1 and 0.5 under
0.75 x LoRA r=4's trainable parameters; all with experiment=peft_arithmetic (same data,
steps, optimiser, evaluation). Extra arguments after ``--`` go to every run. Runs go to
``<out>/<row>/s<seed>``; finished ones are skipped, so re-running resumes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# the experiment's top-level keys, repeated here because configs/config.yaml lists _self_
# after the experiment in its defaults (so its own values win over an experiment's)
TOP_LEVEL = ["group=peft_arithmetic", "run_name=${row}-s${seed}", "save_model=false",
             "eval.dense=false", "progress=false", "print_table=false"]

ROWS = {
    **{f"lora_r{r}": ["method=lora", f"method.rank={r}"] for r in (1, 2, 4)},
    **{f"pissa_r{r}": ["method=pissa", f"method.rank={r}"] for r in (1, 2, 4)},
    "lokr": ["method=lokr"],
    **{f"soka_tau{t}": ["method=soka", f"method.tau={t}"] for t in (0.1, 0.5)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for this sweep's runs")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run")
    args = parser.parse_args()
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)} (known: {', '.join(ROWS)})")
    env = {**os.environ, "WANDB_SILENT": "true"}
    for row in args.rows.split(","):
        folder = Path(args.out) / row
        seeds = [s for s in args.seeds.split(",") if not (folder / f"s{s}" / "metrics.json")
                 .is_file()]
        if not seeds:
            print(f"= {folder} already finished", flush=True)
            continue
        cmd = [sys.executable, str(REPO / "run.py"), "-m", "experiment=peft_arithmetic",
               *ROWS[row], f"row={row}", f"seed={','.join(seeds)}", f"hydra.sweep.dir={folder}",
               "hydra.sweep.subdir=s${seed}", *TOP_LEVEL, *args.extra]
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True)


if __name__ == "__main__":
    main()
