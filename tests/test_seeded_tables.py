"""Seeded table cells (mean ± std over base models) and the bold rule, on exact small
examples (compresslab.report.seeded_cells / bold_verdict)."""

import pytest

from compresslab.report import SeededCell, bold_verdict, fmt_seeded, paired_p_value, seeded_cells


def record(row, base_seed, value, calib_seed=0):
    return {"cfg": {"variant": row, "model": {"pretrain": {"seed": base_seed}},
                    "method": {"calibration": {"seed": calib_seed}}},
            "metrics": {"test/ppl": value}, "dir": f"{row}-{base_seed}-{calib_seed}"}


def test_cells_average_calibration_seeds_within_a_base_model_first():
    records = [record("a", 0, 10.0, 0), record("a", 0, 12.0, 1), record("a", 1, 14.0),
               record("b", 0, 20.0)]
    cells = seeded_cells(records, ["variant"], "test/ppl")
    assert cells[("a",)].values == {0: 11.0, 1: 14.0} and cells[("a",)].runs == 3
    assert cells[("a",)].mean == 12.5 and cells[("a",)].std == pytest.approx(2.1213203)
    assert cells[("b",)].n == 1 and cells[("b",)].std == 0.0
    assert fmt_seeded(cells[("a",)]) == "12.5 ± 2.1" and fmt_seeded(cells[("b",)]) == "20"
    assert fmt_seeded(cells[("a",)], bold=True) == "**12.5 ± 2.1**" and fmt_seeded(None) == "-"


def test_a_lead_on_every_base_model_with_small_spread_is_bold():
    row = {"numerical": SeededCell({0: 10.0, 1: 11.0, 2: 12.0}, 3),
           "wanda": SeededCell({0: 12.0, 1: 13.5, 2: 14.0}, 3),
           "magnitude": SeededCell({0: 30.0, 1: 31.0, 2: 29.0}, 3)}
    verdict = bold_verdict(row, lower_is_better=True)
    assert (verdict.best, verdict.runner_up, verdict.bold) == ("numerical", "wanda", True)
    # differences -2, -2.5, -2: mean -2.167, sd 0.289, t = -13.0 on 2 d.o.f., p = 0.00293
    assert verdict.p_value == pytest.approx(0.0029326, rel=1e-3)
    assert "better on 3/3 base models" in verdict.reason


def test_a_lead_that_flips_on_one_base_model_is_not_bold():
    row = {"numerical": SeededCell({0: 10.0, 1: 10.0, 2: 13.0}, 3),
           "wanda": SeededCell({0: 12.0, 1: 12.0, 2: 12.5}, 3)}
    verdict = bold_verdict(row, lower_is_better=True)
    assert verdict.best == "numerical" and not verdict.bold    # mean 11 vs 12.17, lost on seed 2
    assert "better on 2/3" in verdict.reason


def test_a_lead_on_every_seed_with_large_spread_is_not_bold():
    # higher is better (accuracy): wins on both seeds but the differences vary a lot
    row = {"a": SeededCell({0: 0.95, 1: 0.60}, 2), "b": SeededCell({0: 0.94, 1: 0.30}, 2)}
    verdict = bold_verdict(row, lower_is_better=False)
    assert verdict.best == "a" and verdict.p_value > 0.05 and not verdict.bold


def test_one_base_model_is_never_bold():
    row = {"a": SeededCell({0: 1.0}, 1), "b": SeededCell({0: 100.0}, 1)}
    verdict = bold_verdict(row, lower_is_better=True)
    assert verdict.best == "a" and not verdict.bold and verdict.p_value is None
    assert bold_verdict({"a": SeededCell({0: 1.0, 1: 2.0}, 2)}, True).bold is False


def test_paired_p_value_without_spread_in_the_differences():
    assert paired_p_value([1.0, 2.0], [2.0, 3.0], lower_is_better=True) == 0.0
    assert paired_p_value([1.0, 2.0], [2.0, 3.0], lower_is_better=False) == 1.0


def test_each_base_seed_is_its_own_cached_base_model(tmp_path):
    """The seeded tables' base models differ only in model.pretrain.seed: the cache key
    must too, or every seed would reuse the first base model."""
    from compresslab.base_cache import model_identity
    from conftest import compose_cfg

    identities = [model_identity(compose_cfg(["model=llama_tiny", f"model.pretrain.seed={s}"],
                                             tmp_path)) for s in (0, 1)]
    assert identities[0] != identities[1]
    assert identities[0]["pretrain"]["seed"] == 0 and identities[1]["pretrain"]["seed"] == 1
