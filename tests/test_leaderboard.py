"""The leaderboard's quick variant end to end on tiny settings (a trimmed row list), its
Pareto front, and the compression-cost metrics every run records."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from compresslab.grid import load_grid, run_grid
from conftest import REPO, TINY_LLAMA, TINY_VIT, compose_cfg, load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def script(name: str):
    return load_script(f"experiments/leaderboard/{name}.py", f"leaderboard_{name}")


table = script("table")
GRID = REPO / "experiments" / "leaderboard" / "grid.yaml"


def tiny_quick_grid() -> dict:
    """The quick grid with the test suite's tiny models, one row per family on the LLaMA
    (and one failing row), one on the ViT."""
    grid = load_grid(GRID, "quick")
    llama, vit = grid["settings"]["llama_tiny"], grid["settings"]["vit_tiny"]
    llama["overrides"] = [*TINY_LLAMA, "eval.lm_eval.limit=8",
                          "eval.lm_eval.tasks=[pycode_next_line]"]
    llama["rows"] = ["dense", "svd", "wanda_prune", "broken"]
    vit["overrides"], vit["rows"] = TINY_VIT, ["dense", "wanda_prune"]
    grid["rows"]["broken"] = {"family": "pruning", "overrides": [
        "method=svd", "model.source.num_heads=3", "eval.dense=false"]}
    grid["table"]["repeats"] = 2
    return grid


@pytest.fixture(scope="module")
def board(shared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    grid = tiny_quick_grid()
    extra = [f"paths.root={shared_root}", "logger=none"]
    failed = run_grid(grid, out / "runs", extra=extra)
    md = table.render(out / "runs", out / "tables", quick=True, plan=table.plan_from_grid(grid))
    return out, grid, failed, md, extra


def test_quick_leaderboard_table(board):
    out, grid, failed, md, _ = board
    assert len(failed) == 1 and "variant=broken" in failed[0]
    text = md.read_text()
    assert md.name == "leaderboard_quick.md" and (md.parent / "leaderboard_quick.png").is_file()
    assert "Missing runs: broken r0.3" in text
    svd = json.loads((out / "runs/llama_tiny/svd/r0.3/metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| svd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "30%" and float(cells[3]) == pytest.approx(
        svd["compress/params_ratio"], abs=1e-3)
    assert int(cells[4]) == svd["params/compressed"]
    assert float(cells[5]) == pytest.approx(svd["test/ppl"], rel=1e-3)
    assert float(cells[6]) == pytest.approx(svd["lm_eval/pycode_next_line/acc"], abs=1e-3)
    speed = json.loads((out / "runs" / "speed.json").read_text())
    for setting, key in (("llama_tiny", "svd@0.3"), ("vit_tiny", "wanda_prune@0.3")):
        assert speed[setting]["dense"]["throughput_speedup"] == 1.0   # its own ratio
        assert speed[setting][key]["latency_speedup"] > 0
    assert float(cells[8]) == pytest.approx(speed["llama_tiny"]["svd@0.3"]["throughput_speedup"],
                                            rel=1e-2)
    assert re.search(r"\| wanda_prune \| pruning \| 30% \|", text)
    wanda = json.loads((out / "runs/llama_tiny/wanda_prune/r0.3/metrics.json").read_text())
    best = "svd" if svd["test/ppl"] <= wanda["test/ppl"] else "wanda_prune"
    assert re.search(rf"\| 30% \| {best} \(", text)   # the best row at the budget, under the table
    assert "vit_tiny / digits: quality = test accuracy" in text


def test_rerun_skips_finished_runs(board, capsys):
    out, grid, _, _, extra = board
    assert run_grid(grid, out / "runs", settings=["vit_tiny"], extra=extra) == []
    assert capsys.readouterr().out.count("already finished") == 2


def test_the_tables_plan_comes_from_the_grid():
    plan = table.load_plan(quick=True)
    assert plan["budgets"] == [0.3] and plan["recovery_steps"] == 20
    assert plan["settings"]["vit_tiny"]["rows"] == ["svd", "wanda_prune"]
    assert plan["rows"]["svd_llm_ft"]["family"] == "low-rank"


@pytest.mark.parametrize("quick", [False, True])
def test_rows_that_train_share_the_recovery_budget(tmp_path, quick):
    grid = load_grid(GRID, "quick" if quick else None)
    spent = {}
    for row in ("svd_llm_ft", "spectrum", "pela"):
        s = compose_cfg([*TINY_LLAMA, *grid["rows"][row]["overrides"]], tmp_path).method.stages
        if row == "svd_llm_ft":   # max_steps for each factor in turn
            spent[row] = s.finetune.max_steps * len(s.finetune.order)
        elif row == "spectrum":   # gate search, then fine-tuning
            spent[row] = s.spectrum.max_steps + s.spectrum.finetune_steps
        else:                     # intermediate pre-training, then fine-tuning
            spent[row] = s.pretrain.max_steps + s.finetune.max_steps
    assert set(spent.values()) == {grid["table"]["recovery_steps"]}, spent


def test_pareto_front():
    points = [(1.0, 10.0), (1.2, 12.0), (1.1, 13.0), (0.9, 9.0), (1.2, 11.0)]
    assert table.pareto_front(points, higher_better=False) == [(0.9, 9.0), (1.0, 10.0),
                                                               (1.2, 11.0)]
    assert table.pareto_front(points, higher_better=True) == [(1.1, 13.0), (1.2, 12.0)]


def test_best_rows_and_what_the_training_bought():
    """The answers under each table, on hand-made runs: the best per budget overall and per
    family (a tie goes to the faster row and is counted), and each trained row against its
    `untrained` twin with the relative change in quality."""
    plan = {"rows": {"svd": {"family": "low-rank"}, "svd_llm": {"family": "low-rank"},
                     "ft": {"family": "low-rank", "untrained": "svd_llm"},
                     "wanda": {"family": "pruning"}}}
    ppl = {("svd", 0.3): 40.0, ("svd_llm", 0.3): 38.0, ("ft", 0.3): 38.0, ("wanda", 0.3): 45.0,
           ("svd_llm", 0.5): 50.0, ("ft", 0.5): 45.0, ("wanda", 0.5): 44.0, ("dense", None): 30.0}
    runs = {key: {"metrics": {"test/ppl": q}} for key, q in ppl.items()}
    speed = {"svd_llm@0.3": {"throughput_speedup": 1.1}, "ft@0.3": {"throughput_speedup": 1.2},
             "wanda@0.5": {"throughput_speedup": 1.5}}
    best, families = table.best_rows(runs, speed, plan, "test/ppl", higher=False)
    assert families == ["low-rank", "pruning"]
    assert best == [["30%", "ft (38, 1.2x; 1 tied)", "ft (38, 1.2x; 1 tied)",
                     "wanda (45, not timed)"],
                    ["50%", "wanda (44, 1.5x)", "ft (45, not timed)", "wanda (44, 1.5x)"]]
    gains = table.training_gains(runs, plan, "test/ppl", higher=False)
    assert gains == [["ft", "30%", "38", "svd_llm", "38", "+0.0%"],
                     ["ft", "50%", "45", "svd_llm", "50", "+10.0%"]]
    acc = {key: {"metrics": {"test/acc": 1 / q}} for key, q in ppl.items()}
    assert table.training_gains(acc, plan, "test/acc", higher=True)[1][-1] == "+11.1%"


def test_compression_cost_sees_an_allocation():
    from compresslab.metrics.cost import CompressionCost

    cost = CompressionCost()
    block = np.ones(64 * 1024 * 1024 // 8)   # 64 MiB, touched
    metrics = cost.metrics()
    del block
    if not metrics["cost/peak_rss_reset"]:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert metrics["cost/peak_rss_increase_bytes"] >= 60 * 1024 * 1024


def test_leaderboard_runs_leave_the_framework(board, tmp_path):
    """A pruned LLaMA of the board exports to a folder plain transformers loads with the same
    logits; a pruned ViT is refused (timm has no per-layer sizes), leaving nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from compresslab import load_compressed
    from compresslab.errors import ConfigError
    from compresslab.export import export

    out = board[0] / "runs"
    folder = out / "llama_tiny" / "wanda_prune" / "r0.3" / "compressed"
    info = export(folder, tmp_path / "llama")
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", trust_remote_code=info["trust_remote_code"]).eval()
    model = load_compressed(folder)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="timm has no per-layer sizes"):
        export(out / "vit_tiny" / "wanda_prune" / "r0.3" / "compressed", tmp_path / "vit")
    assert not (tmp_path / "vit").exists() and not (tmp_path / "vit.tmp").exists()
