"""Decisions of the spectrum table re-checked on the validation split: SVD-LLM's
calibration inputs (dense | compressed) and spectrum's search_forward (hard | soft).

    python experiments/spectrum/val_checks.py --out outputs/spectrum_val/<stamp> [-- overrides]

One run per (variant, ratio) with ``experiment=spectrum`` (val and test evaluated), then
``<tables>/spectrum_val.md``: val and test perplexity of every variant. Choose on val;
test is shown beside it only to see whether the choice carries over.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from compresslab.report import collect_runs, fmt, lookup, markdown_table

REPO = Path(__file__).resolve().parents[2]
#: variant (names the run) -> (table label, overrides)
VARIANTS = {
    "svd_llm-dense": ("svd_llm, inputs dense", ["method=svd_llm",
                                                "method.calibration.inputs=dense"]),
    "svd_llm-compressed": ("svd_llm, inputs compressed",
                           ["method=svd_llm", "method.calibration.inputs=compressed"]),
    "spectrum-hard": ("spectrum, search_forward hard",
                      ["method=spectrum", "method.stages.spectrum.search_forward=hard"]),
    "spectrum-soft": ("spectrum, search_forward soft",
                      ["method=spectrum", "method.stages.spectrum.search_forward=soft"]),
}
COMMON = ["experiment=spectrum", "logger=csv", "threads=1", "save_model=false"]


def run_all(out: Path, ratios: list[float], extra: list[str]) -> None:
    env = {**os.environ, "WANDB_SILENT": "true"}
    for variant, (_, overrides) in VARIANTS.items():
        for ratio in ratios:
            folder = out / f"{variant}-r{ratio}"
            if (folder / "metrics.json").is_file():
                continue                                   # finished: re-running resumes
            cmd = [sys.executable, str(REPO / "run.py"), *COMMON, *overrides,
                   f"method.ratio={ratio}", f"+variant={variant}", *extra,
                   f"hydra.run.dir={folder}"]
            print("+", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=REPO, env=env, check=True)


def table(out: Path) -> str:
    rows = []
    for rec in sorted(collect_runs(out), key=lambda r: (lookup(r, "variant"),
                                                         lookup(r, "method.ratio"))):
        label = VARIANTS.get(lookup(rec, "variant"), (lookup(rec, "variant"),))[0]
        rows.append([label, lookup(rec, "method.ratio"),
                     fmt(lookup(rec, "val/ppl")), fmt(lookup(rec, "test/ppl"))])
    return (f"# Spectrum-table decisions on val\n\nRuns: `{out}`.\n\n"
            + markdown_table(["variant", "ratio", "val ppl", "test ppl"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the runs")
    parser.add_argument("--ratios", default="0.6,0.8")
    parser.add_argument("--tables", default="outputs/tables")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run")
    args = parser.parse_args()
    out = Path(args.out)
    run_all(out, [float(r) for r in args.ratios.split(",")], args.extra)
    text = table(out)
    Path(args.tables).mkdir(parents=True, exist_ok=True)
    (Path(args.tables) / "spectrum_val.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
