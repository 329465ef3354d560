"""Run the SVD-family table: one Hydra multirun over the ratios per method, plus the dense
reference (method=none), all in the W&B group "spectrum".

    python experiments/spectrum/sweep.py --out outputs/spectrum_runs/<stamp> [-- overrides]

Overrides after ``--`` go to every run, e.g. a real checkpoint on WikiText-2:
``-- model=llama model.path=/data/llama dataset=text_files dataset.train=... ``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = ["svd", "fwsvd", "asvd", "svd_llm", "svd_llm_ft", "spectrum"]
RATIOS = [0.8, 0.6, 0.4, 0.2]  # the high ratios, where methods differ most, first


def commands(out: Path, methods: list[str], ratios: list[float], extra: list[str],
             spectrum_steps: int | None, finetune_steps: int | None,
             dense: bool = True) -> list[list[str]]:
    base = [sys.executable, str(REPO / "run.py"), "-m", "experiment=spectrum"]
    cmds = [[*base, "method=none", f"hydra.sweep.dir={out}/none", *extra]] if dense else []
    for method in methods:
        own = []
        if method == "spectrum" and spectrum_steps is not None:
            own.append(f"method.stages.spectrum.max_steps={spectrum_steps}")
        if method == "spectrum" and finetune_steps is not None:
            own.append(f"method.stages.spectrum.finetune_steps={finetune_steps}")
        cmds.append([*base, f"method={method}", f"method.ratio={','.join(map(str, ratios))}",
                     f"hydra.sweep.dir={out}/{method}", *own, *extra])
    return cmds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for this sweep's runs")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)),
                        help="comma-separated fractions of the layers' weights removed "
                        "(run in this order)")
    parser.add_argument("--spectrum-steps", type=int, help="gate-search steps of spectrum")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps of spectrum")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense reference run (e.g. adding methods to a sweep)")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"error: unknown methods {sorted(unknown)} ({', '.join(METHODS)})")
    ratios = [float(r) for r in args.ratios.split(",")]
    env = {**os.environ, "WANDB_SILENT": "true"}
    for cmd in commands(Path(args.out), methods, ratios, args.extra, args.spectrum_steps,
                        args.finetune_steps, dense=not args.no_dense):
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True)


if __name__ == "__main__":
    main()
