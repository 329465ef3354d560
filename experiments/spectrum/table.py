"""SVD-family table: val and test perplexity per ratio for svd, fwsvd, asvd, svd_llm,
spectrum beside the dense model, the parameters each row kept (the same budget for all),
the calibration inputs each used, and whether the expected order holds.

    python experiments/spectrum/table.py --runs outputs/spectrum_runs/<stamp>

Writes ``<tables>/spectrum.md``, ``<tables>/spectrum.png`` (perplexity vs ratio, log
scale) and copies each spectrum run's rank heat map to ``spectrum_ranks_r<ratio>.png``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from compresslab.report import (
    BOLD_RULE,
    aggregate,
    bold_verdict,
    collect_runs,
    fmt_seeded,
    line_plot,
    lookup,
    markdown_table,
    seeded_cells,
    verdict_note,
)

#: svd_llm_ft (SVD-LLM + its factor update) is the trained baseline spectrum must face too:
#: spectrum trains its gates, so beating untrained svd_llm alone would not be enough
METHODS = ["svd", "fwsvd", "asvd", "svd_llm", "svd_llm_ft", "spectrum"]
RATIO_KEY = {"spectrum": "spectrum/params_ratio"}  # others: compress/params_ratio


KEPT_KEY = {"spectrum": "spectrum/params_kept"}   # others: compress/params_kept


def cells(records: list[dict], split: str = "test") -> tuple[dict, dict, float | None]:
    """(method, ratio) -> mean ``split`` ppl, (method, ratio) -> achieved ratio, dense ppl."""
    key = f"{split}/ppl"
    keys = [key, "compress/params_ratio", "spectrum/params_ratio"]
    groups = aggregate(records, ["method.name", "method.ratio"], keys)
    ppl, achieved, dense = {}, {}, None
    for g in groups:
        method, ratio = g["method.name"], g["method.ratio"]
        if method == "none":
            dense = g[key][0] if g[key] else None
            continue
        if g[key]:
            ppl[(method, ratio)] = g[key][0]
        got = g[RATIO_KEY.get(method, "compress/params_ratio")]
        if got:
            achieved[(method, ratio)] = got[0]
    return ppl, achieved, dense


def seeded_rows(records: list[dict], methods: list[str], ratios: list[float],
                split: str) -> tuple[list[list[str]], list[str]]:
    """Ratio rows of ``split`` perplexity, mean ± std over base models, the best method bold
    by the bold rule; and one verdict line per ratio."""
    cells = seeded_cells(records, ["method.name", "method.ratio"], f"{split}/ppl")
    dense = next((c for (m, _), c in cells.items() if m == "none"), None)
    rows, notes = [], []
    for r in ratios:
        row = {m: cells[(m, r)] for m in methods if (m, r) in cells}
        verdict = bold_verdict(row, lower_is_better=True)
        rows.append([r, fmt_seeded(dense), *[fmt_seeded(row.get(m), verdict.bold
                                                        and m == verdict.best)
                                             for m in methods]])
        notes.append(verdict_note(f"ratio {r}", verdict))
    return rows, notes


def budgets(records: list[dict]) -> tuple[dict, dict]:
    """(method, ratio) -> parameters kept in the compressed layers; method -> the
    calibration inputs it used (dense | compressed; "-" without calibration)."""
    kept, inputs = {}, {}
    for rec in records:
        method, ratio = lookup(rec, "method.name"), lookup(rec, "method.ratio")
        value = lookup(rec, KEPT_KEY.get(method, "compress/params_kept"))
        if value is not None:
            kept[(method, ratio)] = int(value)
        inputs[method] = lookup(rec, "method.calibration.inputs", "-")
    return kept, inputs


def model_label(model_cfg: dict) -> str:
    """``name`` plus its width x depth when the source has them (e.g. llama_tiny 128x4)."""
    source = model_cfg.get("source", {})
    size = [source.get(k) for k in ("hidden_size", "num_layers")]
    name = model_cfg.get("name", "?")
    return f"{name} {size[0]}x{size[1]}" if all(size) else name


def relative(value: float, reference: float) -> str:
    """``value`` against ``reference`` in words: '2.6% above', '0.8% below'."""
    change = (value - reference) / reference
    return f"{100 * abs(change):.1f}% {'above' if change > 0 else 'below'}"


def order_checks(ppl: dict, ratios: list[float]) -> list[str]:
    """One line per ratio: does svd_llm < asvd < svd and spectrum <= svd_llm hold?"""
    lines = []
    for r in ratios:
        v = {m: ppl.get((m, r)) for m in METHODS}
        if None in (v["svd"], v["asvd"], v["svd_llm"], v["spectrum"]):
            lines.append(f"- ratio {r}: incomplete")
            continue
        first = v["svd_llm"] < v["asvd"] < v["svd"]
        second = v["spectrum"] <= v["svd_llm"]
        line = (f"- ratio {r}: svd_llm < asvd < svd: {'yes' if first else 'NO'}; "
                f"spectrum <= svd_llm: {'yes' if second else 'NO'} "
                f"(spectrum's ppl {relative(v['spectrum'], v['svd_llm'])} svd_llm's)")
        if v["svd_llm_ft"] is not None:
            line += f"; {relative(v['spectrum'], v['svd_llm_ft'])} svd_llm_ft's"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the grid's folder (grid --out)")
    parser.add_argument("--tables", default="outputs/tables")
    args = parser.parse_args()
    records = collect_runs(args.runs)
    if not records:
        raise SystemExit(f"error: no finished runs below {args.runs}")
    ppl, achieved, dense = cells(records)
    val, _, dense_val = cells(records, "val")
    kept, inputs = budgets(records)
    ratios = sorted({r for _, r in ppl})
    methods = [m for m in METHODS if any((m, r) in ppl for r in ratios)]
    rows, notes = seeded_rows(records, methods, ratios, "test")
    val_rows, val_notes = seeded_rows(records, methods, ratios, "val")
    ratio_rows = [[r, *[achieved.get((m, r), "-") for m in methods]] for r in ratios]
    kept_rows = [[r, *[kept.get((m, r), "-") for m in methods]] for r in ratios]
    model = model_label(records[0]["cfg"].get("model", {}))
    data = next((rec["cfg"].get("dataset", {}).get("name") for rec in records), "?")
    text = (f"# SVD family vs learned spectrum: {model} on {data}\n\n"
            f"Test perplexity (lower is better); ratio = fraction of the compressed layers' "
            f"weights removed. Runs: `{args.runs}` (W&B group `spectrum`). {BOLD_RULE}\n\n"
            + markdown_table(["ratio", "dense", *methods], rows)
            + "\nBold rule per ratio:\n\n" + "\n".join(notes) + "\n"
            + "\nValidation perplexity (what choices are made on):\n\n"
            + (markdown_table(["ratio", "dense", *methods], val_rows)
               + "\nBold rule per ratio (val):\n\n" + "\n".join(val_notes) + "\n" if val else
               "(no val split evaluated: eval.splits lacks val)\n")
            + "\nAchieved ratio of the compressed layers:\n\n"
            + markdown_table(["ratio", *methods], ratio_rows)
            + "\nParameters kept in the compressed layers (the budget every row meets; "
            "spectrum: within one component below it):\n\n"
            + markdown_table(["ratio", *methods], kept_rows)
            + "\nCalibration inputs (dense: statistics of the uncompressed model; compressed: "
            "of the already-compressed prefix): "
            + ", ".join(f"{m} {inputs.get(m) or '-'}" for m in methods) + "\n"
            + "\nExpected order of the means over base models (svd_llm < asvd < svd, "
            "spectrum <= svd_llm):\n\n"
            + "\n".join(order_checks(ppl, ratios)) + "\n")
    out = Path(args.tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectrum.md").write_text(text)
    series = {m: ([r for r in ratios if (m, r) in ppl], [ppl[(m, r)] for r in ratios
                                                          if (m, r) in ppl]) for m in methods}
    if dense:
        series["dense"] = (ratios, [dense] * len(ratios))
    line_plot(series, out / "spectrum.png", xlabel="ratio (fraction of layer weights removed)",
              ylabel="test perplexity", title=f"{model} / {data}", logy=True)
    for rec in records:
        heat = Path(rec["dir"]) / "spectrum_ranks.png"
        if heat.is_file():
            shutil.copy(heat, out / f"spectrum_ranks_r{rec['cfg']['method']['ratio']}.png")
    print(text)


if __name__ == "__main__":
    main()
