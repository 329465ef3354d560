"""Run the PELA ablation: for each row, one Hydra multirun over ratios and seeds.

    python experiments/pela/sweep.py --out outputs/pela_runs/<stamp> [--quick]

Rows (each followed by the same downstream fine-tuning, the method's ``finetune`` stage):
dense (no decomposition) | lra (SVD only) | lra_ft (+ intermediate training, task loss
only) | lra_fd (+ feature distillation) | lra_fd_wpr (+ weight-perturbation
regularisation). Extra arguments after ``--`` go to every run (e.g. step counts).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ROWS = {
    "dense": ["method.stages.decompose=null", "method.stages.pretrain=null"],
    "lra": ["method.stages.pretrain=null"],
    "lra_ft": ["method.stages.pretrain.fd_weight=0", "method.stages.pretrain.wpr_weight=0"],
    "lra_fd": ["method.stages.pretrain.wpr_weight=0"],
    "lra_fd_wpr": [],
}

# every run: one W&B group, the row in its name, one thread (several runs share a small CPU)
COMMON = ["group=pela", "run_name=pela-${row}-${model.name}-${dataset.name}-r${method.ratio}"
          "-s${seed}", "threads=1", "save_model=false", "print_table=false", "progress=false"]

# (model, dataset, ratios, seeds); dense does not depend on the ratio: run it once per seed.
# 0.9 is beyond the ratios: on digits the ViT loses no accuracy to SVD up to ~0.8.
SETTINGS = [
    ("vit_tiny", "digits", [0.3, 0.5, 0.7, 0.9], [0, 1, 2]),
    ("llama_tiny", "pycode", [0.5], [0]),
]


def commands(out: Path, extra: list[str], models: list[str], seeds: list[int] | None,
             ratios: list[float] | None, rows: list[str]) -> list[list[str]]:
    cmds = []
    for model, dataset, default_ratios, default_seeds in SETTINGS:
        if model not in models:
            continue
        ratios_here = ratios or default_ratios
        seeds_here = seeds or default_seeds
        for row, overrides in ROWS.items():
            if row not in rows:
                continue
            row_ratios = ratios_here[:1] if row == "dense" else ratios_here
            cmds.append([sys.executable, str(REPO / "run.py"), "-m", "experiment=pela",
                         f"model={model}", f"dataset={dataset}", f"row={row}", *COMMON,
                         *extra,  # before the row's own overrides, which may null a stage
                         *overrides, f"method.ratio={','.join(map(str, row_ratios))}",
                         f"seed={','.join(map(str, seeds_here))}",
                         f"hydra.sweep.dir={out}/{model}-{row}"])
    return cmds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for this sweep's runs")
    parser.add_argument("--models", default="vit_tiny,llama_tiny",
                        help="comma-separated subset of the models")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of "
                        f"the rows ({', '.join(ROWS)})")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2 for the ViT, "
                        "0 for the LLaMA)")
    parser.add_argument("--ratios", help="comma-separated ratios for every model "
                        "(default: 0.3,0.5,0.7,0.9 for the ViT, 0.5 for the LLaMA)")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run")
    args = parser.parse_args()
    out = Path(args.out)
    env = {**os.environ, "WANDB_SILENT": "true"}
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"error: unknown rows {sorted(unknown)} ({', '.join(ROWS)})")
    failed = []
    for cmd in commands(out, args.extra, args.models.split(","), seeds, ratios, rows):
        print("+", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
            failed.append(" ".join(cmd[3:]))  # the other rows still run
    if failed:
        raise SystemExit("error: these sweeps failed:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
