"""The closed-form DLN gradient step against the plain autograd step, and the record of one
iterate per row."""

import json

import pytest
import torch

from compresslab.compress import dln, dln_gd
from compresslab.data.matrix import MatrixFactorizationDataModule
from compresslab.data.matrix_recovery import MatrixCompletionDataModule, MatrixSensingDataModule
from compresslab.errors import ConfigError
from compresslab.models.architecture import adapter_for
from compresslab.models.deep_linear import DeepLinearNetwork
from compresslab.pipeline import run
from conftest import compose_cfg


def weighted_completion() -> dict:
    """A completion batch whose mask is not 0/1 (weights 0..2): the gradient is m^2 R."""
    batch = MatrixCompletionDataModule(d=16, r=2, p=0.5).make_batch()
    weights = torch.rand(16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch["mask"] = batch["mask"] * 2 * weights
    return batch


PROBLEMS = {
    "factorization": (lambda: MatrixFactorizationDataModule(d=16, r=2).make_batch(),
                      MatrixFactorizationDataModule(d=16, r=2).task, 4.0),
    "completion": (lambda: MatrixCompletionDataModule(d=16, r=2, p=0.4).make_batch(),
                   MatrixCompletionDataModule(d=16, r=2).task, 2.0),
    "weighted mask": (weighted_completion, MatrixCompletionDataModule(d=16, r=2).task, 2.0),
    "sensing": (lambda: MatrixSensingDataModule(d=10, r=2, m=300).make_batch(),
                MatrixSensingDataModule(d=10, r=2, m=300).task, 2.0),
}


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def trajectory(stepper, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    losses = []
    for _ in range(steps):
        losses.append(stepper.forward())
        stepper.update()
    return losses, [w.detach().clone() for w in stepper.weights]


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("dims", [[16, 16, 16, 16], [16, 4, 4, 4, 16], [16, 3, 16]])
def test_closed_form_steps_equal_autograd_steps(problem, dims):
    make_batch, task, lr = PROBLEMS[problem]
    batch = make_batch()
    dims = [len(batch["target"][0])] + dims[1:-1] + [len(batch["target"])]
    lrs = [2 * lr] + [lr] * (len(dims) - 3) + [2 * lr]           # alpha 2 on the outer layers
    runs = {}
    for kind in ("closed_form", "autograd"):
        torch.manual_seed(0)
        net = DeepLinearNetwork(dims, init_scale=0.3)
        weights = [layer.weight for layer in net.layers]
        stepper = (dln_gd.ProductGD(weights, lrs, batch) if kind == "closed_form" else
                   dln_gd.AutogradGD(net, adapter_for(net), task, weights, lrs, batch))
        runs[kind] = trajectory(stepper, 300)
        # the stepper's product is the network's own end-to-end matrix at the last forward
        stepper.forward()
        torch.testing.assert_close(stepper.product, net.end_to_end().detach(), rtol=0, atol=0)
    (fast, fast_w), (ref, ref_w) = runs["closed_form"], runs["autograd"]
    assert ref[-1] < 0.5 * ref[0]                       # the runs moved (a test that can fail)
    torch.testing.assert_close(as64(fast), as64(ref), rtol=1e-12, atol=1e-12)
    for a, b in zip(fast_w, ref_w):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_plain_linear_layers_take_the_closed_form():
    net = DeepLinearNetwork([4, 4, 4])
    assert dln_gd.plain_weights(net, net.layers) == [layer.weight for layer in net.layers]
    net.layers[0] = torch.nn.Linear(4, 4, dtype=torch.float64)          # a bias
    assert dln_gd.plain_weights(net, net.layers) is None


def test_notebook_init_is_v_u_unscaled_at_depth_two():
    m_hat = torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(m_hat, full_matrices=False)
    first, last = dln.spectral_init(m_hat, width=3, depth=2, eps=0.05, init="notebook")
    torch.testing.assert_close(first, vh[:3])
    torch.testing.assert_close(last, u[:, :3])
    paper = dln.spectral_init(m_hat, width=3, depth=2, eps=0.05)
    torch.testing.assert_close(paper[0], 0.05 * vh[:3])
    with pytest.raises(ValueError, match="depth 2"):
        dln.spectral_init(m_hat, width=3, depth=3, eps=0.05, init="notebook")


def test_notebook_init_runs_at_depth_two_from_unit_modes(tmp_path):
    run(compose_cfg(["experiment=dln_completion", "method=dln_compressed",
                     "model.source.depth=2", "method.stages.compress.init=notebook",
                     "dataset.datamodule.d=12", "dataset.datamodule.r=2",
                     "method.stages.train.max_steps=3", "method.stages.train.callbacks=[]",
                     "method.stages.train.sv_every=1", "method.alpha=1"],
                    tmp_path, tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "train_trajectory.json").read_text())
    # W(0) = U_4 V_4^T: four singular values at 1 (the paper's start has them at eps^2)
    torch.testing.assert_close(as64(record["sv"][0]), as64([1.0] * 4), rtol=1e-12, atol=0)


SMALL = ["experiment=dln_factorization", "dataset.datamodule.d=12", "dataset.datamodule.r=2",
         "method.stages.train.max_steps=40", "model.source.init_scale=0.1",
         "method.stages.train.optim.lr=8", "method.stages.train.callbacks=[]",
         "method.stages.train.sv_every=1", "method.stages.train.diag_every=1"]


def test_a_row_records_loss_and_recovery_of_the_same_iterate(tmp_path):
    run(compose_cfg(SMALL, tmp_path, tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "train_trajectory.json").read_text())
    # factorization: the training loss IS the recovery half-MSE, so the same iterate gives
    # the same number (before, the recovery error was one update later than the loss)
    torch.testing.assert_close(as64(record["loss"]), as64(record["recovery_mse"]),
                               rtol=1e-12, atol=0)
    loss = as64(record["loss"])
    assert ((loss[:-1] - loss[1:]).abs() > 1e-6 * loss[1:]).all()  # a step apart would fail
    # row 0's singular values are the initial network's: eps^3 O3 O2 O1 has all at 1e-3
    torch.testing.assert_close(as64(record["sv"][0]), as64([1e-3] * 4), rtol=1e-12, atol=0)


def test_closed_form_and_autograd_runs_write_the_same_trajectory(tmp_path):
    records = {}
    for kind in ("closed_form", "autograd"):
        run(compose_cfg([*SMALL, f"method.stages.train.gradients={kind}"], tmp_path,
                        tmp_path / kind))
        records[kind] = json.loads((tmp_path / kind / "train_trajectory.json").read_text())
    for key in ("loss", "recovery_mse", "recovery_rel"):
        torch.testing.assert_close(as64(records["closed_form"][key]),
                                   as64(records["autograd"][key]), rtol=1e-12, atol=0)
    assert records["closed_form"]["diagnostics"] == records["autograd"]["diagnostics"]


@pytest.mark.parametrize("override, message", [
    ("method.stages.train.gradients=jax", "gradients must be one of"),
    ("method.stages.compress.init=notebook", "init=notebook is the authors' depth-2"),
    ("method.stages.compress.init=paper_v2", "init must be one of"),
])
def test_bad_gd_options_stop_before_work(tmp_path, override, message):
    cfg = compose_cfg(["experiment=dln_completion", "method=dln_compressed",
                       "dataset.datamodule.d=30", override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run").exists()
