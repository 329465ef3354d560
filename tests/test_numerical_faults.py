"""Numerical faults: a NaN/Inf loss stops the run with the step and the last good
checkpoint; every matrix solve repairs singular input with reported damping and refuses
NaN input by name, never returning NaN silently."""

import math

import pytest
import torch

from compresslab.compress.linalg import RepairLog, cholesky_with_repair, spd_inverse, spd_solve
from compresslab.compress.structured_pruning import (
    LayerInputs,
    NumericalScore,
    OBSCompensation,
    mask_hessian,
    numerical_mask,
    numerical_mask_newton,
    obs_update,
)
from compresslab.compress.svd_family import (
    ActivationAwareSVD,
    FisherWeightedSVD,
    WhitenedSVD,
    positive_scale,
)
from compresslab.errors import NumericalError
from compresslab.pipeline import run
from compresslab.stages import modules
from conftest import TINY_LLAMA, compose_cfg, fitting, read_metrics, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def rank_deficient_inputs(tokens=5, channels=12, dead=(3, 7)):
    """Fewer tokens than channels and dead channels: X^T X is singular."""
    x = torch.randn(tokens, channels, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    x[:, list(dead)] = 0
    return x


def layer_inputs(x: torch.Tensor) -> LayerInputs:
    stats = LayerInputs()
    stats.update(x)
    return stats


# -- the shared repair ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["rank_deficient", "zero", "indefinite"])
def test_cholesky_repair_of_singular_and_indefinite_matrices(case):
    x = rank_deficient_inputs()
    gram = {"rank_deficient": x.T @ x, "zero": torch.zeros(12, 12, dtype=torch.float64),
            "indefinite": x.T @ x - 0.5 * torch.eye(12, dtype=torch.float64)}[case]
    chol, shift = cholesky_with_repair(gram, eps=1e-6)
    assert shift > 0 and finite(chol)
    torch.testing.assert_close(chol @ chol.T, gram + shift * torch.eye(12, dtype=gram.dtype))
    # zero matrix: the shift is eps in units of 1 (no diagonal to scale by), not ~1e-300
    if case == "zero":
        assert shift == pytest.approx(1e-6)
    solved = spd_solve(gram, torch.ones(12, dtype=torch.float64), repairs=(log := RepairLog("t")))
    assert finite(solved) and log.report() == {"t_repairs": 1, "t_max_shift": shift}
    assert finite(spd_inverse(gram))


def test_nan_matrix_is_refused_by_name():
    gram = torch.eye(4, dtype=torch.float64)
    gram[1, 2] = math.nan
    with pytest.raises(NumericalError, match="X of layer.q has NaN/Inf entries"):
        cholesky_with_repair(gram, what="X of layer.q")


# -- each solve site ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["rank_deficient", "zero"])
def test_whitened_svd_on_singular_gram_gives_finite_factors_and_reports(case):
    x = rank_deficient_inputs() if case == "rank_deficient" else torch.zeros(5, 12,
                                                                             dtype=torch.float64)
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(1)).float()
    decomposer = WhitenedSVD()
    stats = decomposer.input_statistic()
    stats.update(x.float())
    left, right = decomposer(w, 4, "blocks.0.q", stats)
    assert finite(left) and finite(right)
    assert decomposer.report()["cholesky_repairs"] == 1
    assert decomposer.report()["cholesky_max_shift"] > 0
    if case == "zero":  # no signal: the whitening is a scalar, i.e. the plain truncated SVD
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close((left @ right).double(), best, rtol=1e-4, atol=1e-4)


def test_whitened_svd_refuses_nan_statistics_by_layer():
    decomposer = WhitenedSVD()
    stats = decomposer.input_statistic()
    stats.update(torch.full((3, 6), math.nan))
    with pytest.raises(NumericalError, match="X\\^T X of blocks.1.up has NaN/Inf"):
        decomposer(torch.randn(4, 6), 2, "blocks.1.up", stats)


def test_scaled_svds_with_all_zero_statistics_fall_back_to_plain_svd():
    assert torch.equal(positive_scale(torch.zeros(5), 1e-6), torch.ones(5, dtype=torch.float64))
    with pytest.raises(NumericalError, match="statistics of layer.v have NaN"):
        positive_scale(torch.tensor([1.0, math.nan]), 1e-6, "layer.v")
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    zero_fisher = FisherWeightedSVD()(w, 2, "l", torch.zeros(6))
    zero_acts = ActivationAwareSVD()(w, 2, "l", layer_inputs(torch.zeros(3, 5)))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    plain = (u[:, :2] * s[:2]) @ vh[:2]          # the best rank-2 approximation
    for left, right in (zero_fisher, zero_acts):
        assert finite(left) and finite(right)
        torch.testing.assert_close((left @ right).double(), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("newton", [0, 5])
def test_numerical_score_with_singular_mask_hessian_is_repaired_and_reported(newton):
    x = rank_deficient_inputs()
    weight = torch.randn(7, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hl = mask_hessian(weight, x.T @ x, damping=0.0)       # no damping: singular
    assert int(torch.linalg.cholesky_ex(hl)[1]) > 0
    log = RepairLog("score_cholesky")
    z = (numerical_mask_newton(hl, 8.0, 1.0, newton, repairs=log) if newton
         else numerical_mask(hl, 8.0, 1.0, log))
    assert finite(z) and log.count == 1
    score = NumericalScore(1 / 3, damping=0.0, newton_steps=newton)
    assert finite(score(weight.float(), layer_inputs(x), 3))
    assert score.report()["score_cholesky_repairs"] == 1


def test_obs_compensation_with_singular_gram_is_repaired_and_reported():
    x = rank_deficient_inputs()
    weight = torch.randn(7, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pruned = torch.tensor([1, 3, 8])
    log = RepairLog("compensation_cholesky")
    updated = obs_update(weight, x.T @ x, pruned, damping=0.0, repairs=log)
    assert finite(updated) and updated[:, pruned].abs().max() == 0 and log.count >= 1
    # the kept rows still fit the layer's outputs on these tokens (what OBS minimises)
    plain = weight.clone()
    plain[:, pruned] = 0
    target = x @ weight.T
    assert (x @ updated.T - target).norm() <= (x @ plain.T - target).norm() + 1e-9
    nan_gram = x.T @ x
    nan_gram[0, 0] = math.nan
    with pytest.raises(NumericalError, match="NaN/Inf"):
        obs_update(weight, nan_gram, pruned, damping=0.0)
    layer = torch.nn.Linear(12, 7, bias=False, dtype=torch.float64)
    layer.weight.data.copy_(weight)
    compensation = OBSCompensation(0.0)
    compensation(layer, layer_inputs(x), pruned)
    assert finite(layer.weight) and compensation.report()["compensation_cholesky_repairs"] >= 1


def test_pruning_run_reports_repairs_of_singular_statistics(shared_root, tmp_path):
    """Undamped numerical pruning on 4 x 8 calibration tokens (fewer than the MLP's 176
    channels): the singular solves are repaired, the repairs are in metrics.json, nothing
    is NaN."""
    metrics = run(compose_cfg([*TINY_LLAMA, "method=numerical_pruning", "method.damping=0",
                               "method.score_damping=0", "method.num_samples=4",
                               "method.seq_len=8", "method.stages.prune.latency_repeats=0"],
                              shared_root, tmp_path / "run"))
    assert metrics["prune/score_cholesky_repairs"] >= 0   # (W W^T) o (X^T X) is rarely singular
    assert metrics["prune/compensation_cholesky_repairs"] > 0
    assert read_metrics(tmp_path / "run")["prune/compensation_cholesky_max_shift"] > 0
    assert math.isfinite(metrics["test/ppl"])


# -- a NaN/Inf training loss ------------------------------------------------------------------

TRAIN = [*TINY_LLAMA, "method=train", "method.stages.train.max_steps=12",
         "method.stages.train.log_every=1"]


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(shared_root, tmp_path,
                                                              monkeypatch):
    original = modules.TrainModule.task_loss

    def poisoned(self, batch):
        loss = original(self, batch)
        poison = self.global_step == 5 and fitting(self.trainer, "00-train")
        return loss * math.nan if poison else loss

    monkeypatch.setattr(modules.TrainModule, "task_loss", poisoned)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "00-train" / "last.ckpt"
    with pytest.raises(modules.NonFiniteLossError) as info:
        run(compose_cfg([*TRAIN, "checkpoint_every=2", "logger=csv"], shared_root, run_dir))
    assert str(info.value) == (f"stage train: training loss is nan at step 5; "
                               f"last good checkpoint: {ckpt} (step 4)")
    assert ckpt.is_file() and not (run_dir / "metrics.json").exists()
    # what the logger had received is on disk (it was finalised, not dropped)
    rows = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in rows and len(rows.splitlines()) >= 5


def test_cli_diverging_training_is_one_error_line_and_exit_1(shared_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TRAIN, "method.stages.train.optim.lr=1e30", "logger=csv",
                      "progress=false", f"paths.root={shared_root}", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage train: training loss is ")
    assert "at step " in last and last.endswith("last good checkpoint: none yet")
    assert not (run_dir / "metrics.json").exists()
