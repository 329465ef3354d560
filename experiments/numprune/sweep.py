"""Run the numerical pruning table: one Hydra multirun per (model, row) over the ratios.

    python experiments/numprune/sweep.py --out outputs/numprune_runs/<stamp>

Rows: dense (method=none) | numerical | numerical without compensation | magnitude |
wanda | flap (on request also numerical with lambda 0.01 or 100). Models: llama_tiny on
pycode (perplexity) and ar_image on digit_tokens (bits per pixel, plus generated samples
scored by a fixed classifier). Extra arguments after ``--`` go to every run. A finished
run (``<out>/<model>-<row>/r<ratio>``) is skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ROWS = {
    "dense": ["method=none"],
    "numerical": ["method=numerical_pruning"],
    "numerical_nocomp": ["method=numerical_pruning", "method.compensate=false"],
    "magnitude": ["method=magnitude_prune"],
    "wanda": ["method=wanda_prune"],
    "flap": ["method=flap"],
    # lambda sensitivity (not in the default rows: --rows numerical_lam0.01,numerical_lam100)
    "numerical_lam0.01": ["method=numerical_pruning", "method.lam=0.01"],
    "numerical_lam100": ["method=numerical_pruning", "method.lam=100"],
}
DEFAULT_ROWS = ["dense", "numerical", "numerical_nocomp", "magnitude", "wanda", "flap"]
SETTINGS = {"llama_tiny": "pycode", "ar_image": "digit_tokens"}
SAMPLES = ("+method.stages.samples={_target_:compresslab.stages.samples.SampleQualityStage,"
           "per_class:10,seed:0}")


def commands(out: Path, models: list[str], rows: list[str], ratios: list[str],
             extra: list[str], tag: str = "") -> list[list[str]]:
    """One multirun per (model, row) over the ratios not finished yet (``<folder>/r<ratio>``)."""
    cmds = []
    for model in models:
        for row in rows:
            folder = out / f"{model}{f'-{tag}' if tag else ''}-{row}"
            todo = [r for r in (["none"] if row == "dense" else ratios)
                    if not (folder / f"r{r}" / "metrics.json").is_file()]
            if not todo:
                print(f"= {folder} already finished", flush=True)
                continue
            args = [sys.executable, str(REPO / "run.py"), "-m", "experiment=numprune",
                    f"model={model}", f"dataset={SETTINGS[model]}", f"variant={row}",
                    *ROWS[row], f"hydra.sweep.dir={folder}",
                    "hydra.sweep.subdir=r${oc.select:method.ratio,none}", "progress=false",
                    "print_table=false", "threads=1"]   # tiny models: 1 thread is faster, steadier
            if row != "dense":
                args += [f"method.ratio={','.join(todo)}", "eval.dense=false"]
            if model == "ar_image":
                args.append(SAMPLES)
            cmds.append(args + extra)
    return cmds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for this sweep's runs")
    parser.add_argument("--models", default=",".join(SETTINGS), help="comma-separated models")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5", help="comma-separated ratios")
    parser.add_argument("--tag", default="", help="folder tag for a variant of the models "
                        "(e.g. other sizes given as extra overrides)")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run")
    args = parser.parse_args()
    env = {**os.environ, "WANDB_SILENT": "true"}
    for cmd in commands(Path(args.out), args.models.split(","), args.rows.split(","),
                        args.ratios.split(","), args.extra, args.tag):
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True)

if __name__ == "__main__":
    main()
