"""DLN training on matrix factorization exercises the singular-value trajectory callback."""

import json

import torch

from compresslab.data.matrix import spread_low_rank_target
from compresslab.models.deep_linear import DeepLinearNetwork
from compresslab.pipeline import run
from conftest import compose_cfg

DLN_SMALL = ["experiment=dln_factorization", "dataset.datamodule.d=20",
             "dataset.datamodule.r=2", "method.stages.train.max_steps=1000",
             "method.stages.train.callbacks.0.every_n_steps=20",
             "method.stages.train.callbacks.0.top_k=4", "model.source.init_scale=0.1",
             "method.stages.train.optim.lr=12"]


def test_dln_init_is_scaled_orthogonal():
    torch.manual_seed(0)
    net = DeepLinearNetwork([6, 6, 6], init_scale=0.01)
    for layer in net.layers:
        torch.testing.assert_close(layer.weight @ layer.weight.T,
                                   1e-4 * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(net.end_to_end(), net.layers[1].weight @ net.layers[0].weight)


def test_dln_training_records_singular_value_trajectories(tmp_path):
    metrics = run(compose_cfg(DLN_SMALL, tmp_path, tmp_path / "run"))
    assert metrics["test/recovery_mse"] < 1e-6 * metrics["dense/test_recovery_mse"]
    assert metrics["train/steps"] == 1000
    record = json.loads((tmp_path / "run" / "train_singular_values.json").read_text())
    assert (tmp_path / "run" / "train_singular_values.png").stat().st_size > 5000
    series = torch.tensor(record["values"]["end_to_end"], dtype=torch.float64)
    assert record["steps"][0] == 0 and record["steps"][-1] == 1000
    assert series.shape == (len(record["steps"]), 4)
    # the two target singular values are learned exactly; the others stay at eps^L = 1e-3
    target = torch.linalg.svdvals(spread_low_rank_target(20, 2, 0))[:2]
    torch.testing.assert_close(series[-1, :2], target, rtol=1e-6, atol=0)
    assert torch.allclose(series[:, 2:], torch.full_like(series[:, 2:], 1e-3), rtol=0.02)
