"""Collecting sweep results and aggregating seeds."""

import json

import pytest

from compresslab.report import aggregate, collect_runs, fmt, fmt_mean_std, markdown_table, mean_std


def _fake_run(folder, method, seed, acc):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"method:\n  name: {method}\nseed: {seed}\n")
    (folder / "metrics.json").write_text(json.dumps({"test/acc": acc}))


def test_collect_and_aggregate_over_seeds(tmp_path):
    _fake_run(tmp_path / "0", "svd", 0, 0.5)
    _fake_run(tmp_path / "1", "svd", 1, 0.7)
    _fake_run(tmp_path / "2", "pela", 0, 0.9)
    (tmp_path / "3").mkdir()  # unfinished run: skipped
    records = collect_runs(tmp_path)
    assert len(records) == 3
    rows = aggregate(records, ["method.name"], ["test/acc"])
    assert rows[0]["method.name"] == "svd" and rows[0]["n"] == 2
    mean, std = rows[0]["test/acc"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414213562, rel=1e-8)
    assert fmt_mean_std(rows[1]["test/acc"]) == "0.9"
    assert mean_std([2.0]) == (2.0, 0.0)
    table = markdown_table(["method", "acc"], [["svd", fmt_mean_std(rows[0]["test/acc"])]])
    assert table.splitlines()[2] == "| svd | 0.6 ± 0.14 |"


def test_fmt_keeps_the_asked_significant_digits_in_both_notations():
    assert fmt(228012.3, 3) == "2.28e+05" and fmt(12345.6, 3) == "1.23e+04"
    assert fmt(0.00095034, 3) == "9.50e-04" and fmt(0.0037, 3) == "0.0037"
    assert fmt(228012.3) == "2.280e+05" and fmt(3) == "3"
