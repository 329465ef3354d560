"""Width-reduced deep linear networks (docs/dln.md): data, spectral init, GD, diagnostics."""

import json
import math

import pytest
import torch

from compresslab.compress import dln
from compresslab.data.matrix import spread_low_rank_target
from compresslab.data.matrix_recovery import (
    MatrixCompletionDataModule,
    MatrixSensingDataModule,
    RatingsDataModule,
)
from compresslab.errors import ConfigError
from compresslab.models.deep_linear import DeepLinearNetwork
from compresslab.pipeline import run
from conftest import compose_cfg

SMALL_FACTORIZATION = ["experiment=dln_factorization", "dataset.datamodule.d=20",
                       "dataset.datamodule.r=3", "method.stages.train.max_steps=600",
                       "model.source.init_scale=0.05", "method.stages.train.sv_every=1",
                       "method.stages.train.diag_every=300", "method.stages.train.optim.lr=12",
                       "method.stages.train.callbacks=[]", "threads=1",
                       # eps 0.05 (for speed): the uniformly shrunk d - 2r directions of
                       # W_l - W_l(0) are ~3e-6 of the largest here, above the default 1e-7
                       "method.stages.train.rank_rtol=1e-5"]


# -- data ------------------------------------------------------------------------------------

def test_completion_mask_has_floor_p_d2_entries_and_is_seeded():
    data = MatrixCompletionDataModule(d=30, r=3, p=0.3, mask_seed=4)
    batch = data.make_batch()
    assert int(batch["mask"].sum()) == math.floor(0.3 * 900)
    torch.testing.assert_close(batch["mask"] + batch["eval_mask"], torch.ones(30, 30,
                                                                             dtype=torch.float64))
    torch.testing.assert_close(batch["target"], spread_low_rank_target(30, 3, 0))
    assert torch.equal(MatrixCompletionDataModule(d=30, r=3, mask_seed=4).make_batch()["mask"],
                       batch["mask"])
    with pytest.raises(ConfigError, match="dataset.p=1.5"):
        MatrixCompletionDataModule(d=30, r=3, p=1.5).check()


def test_sensing_measurements_and_surrogate():
    data = MatrixSensingDataModule(d=12, r=2, m=3000)
    batch = data.make_batch()
    a, target = batch["A"], batch["target"]
    assert a.shape == (3000, 12, 12) and a.dtype == torch.float64
    assert abs(float(a.std()) * 3000 - 1) < 0.01                # entries N(0, 1/m^2)
    torch.testing.assert_close(batch["y"][7], (a[7] * target).sum())
    m_hat = dln.surrogate(batch)                               # (1/m) sum y_i A_i
    torch.testing.assert_close(m_hat, (batch["y"][:, None, None] * a).mean(0))
    assert dln.mean_curvature(batch) == pytest.approx(1 / 3000, rel=0.01)
    # E[M_hat] = M* / m^2, so its top singular vectors point along M*'s
    top = torch.linalg.svd(m_hat)[0][:, :2]
    u_star = torch.linalg.svd(target)[0][:, :2]
    assert torch.linalg.svdvals(top.T @ u_star).min() > 0.9


def test_ratings_file_is_read_and_split(tmp_path):
    path = tmp_path / "u.data"
    lines = [f"{u}\t{i}\t{(u * i) % 5 + 1}\t88125" for u in (3, 5, 9, 11) for i in range(1, 9)
             if (u + i) % 3]
    path.write_text("\n".join(lines) + "\n")
    data = RatingsDataModule(path=str(path), r=1, test_fraction=0.25)
    data.check()
    assert data.spec().matrix_shape == (4, 8)
    batch = data.make_batch()
    assert int(batch["mask"].sum() + batch["eval_mask"].sum()) == len(lines)
    assert int(batch["eval_mask"].sum()) == round(0.25 * len(lines))
    assert float(batch["target"][0, 0]) == (3 * 1) % 5 + 1     # user 3, item 1
    assert (batch["mask"] * batch["eval_mask"]).sum() == 0
    with pytest.raises(ConfigError, match="does not exist"):
        RatingsDataModule(path=str(tmp_path / "missing")).check()


# -- spectral initialisation and one GD step ---------------------------------------------------

def test_spectral_init_equals_its_definition():
    m_hat = torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(m_hat, full_matrices=False)
    first, middle, last = dln.spectral_init(m_hat, width=4, depth=3, eps=0.05)
    torch.testing.assert_close(first, 0.05 * vh[:4])
    torch.testing.assert_close(middle, 0.05 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(last, 0.05 * u[:, :4])
    # end-to-end at step 0: eps^L U V^T
    torch.testing.assert_close(last @ middle @ first, 0.05 ** 3 * u[:, :4] @ vh[:4])
    assert dln.compressed_params(9, 7, 4, 3) == sum(w.numel() for w in (first, middle, last))


def aligned_original(m_star: torch.Tensor, eps: float) -> DeepLinearNetwork:
    """Square 3-layer network with W1 = eps V^T, W2 = eps I, W3 = eps U (full bases of M*):
    the case where the theory says the compressed network's dynamics are the original's
    restricted to the top singular subspaces."""
    u, _, vh = torch.linalg.svd(m_star)
    net = DeepLinearNetwork([len(m_star)] * 4, init_scale=eps)
    with torch.no_grad():
        net.layers[0].weight.copy_(eps * vh)
        net.layers[1].weight.copy_(eps * torch.eye(len(m_star), dtype=torch.float64))
        net.layers[2].weight.copy_(eps * u)
    return net


def gd_step(net: DeepLinearNetwork, target: torch.Tensor, lrs: list[float]) -> None:
    loss = 0.5 * (net.end_to_end() - target).pow(2).mean()
    grads = torch.autograd.grad(loss, [layer.weight for layer in net.layers])
    with torch.no_grad():
        for layer, g, lr in zip(net.layers, grads, lrs):
            layer.weight.sub_(lr * g)


def test_alpha_one_compressed_step_is_the_projected_original_step():
    d, r, width, eps, lr = 16, 2, 4, 0.3, 50.0
    m_star = spread_low_rank_target(d, r, seed=3)
    original = aligned_original(m_star, eps)
    compressed = DeepLinearNetwork([d, width, width, d])
    with torch.no_grad():
        for layer, w in zip(compressed.layers, dln.spectral_init(m_star, width, 3, eps)):
            layer.weight.copy_(w)
    for _ in range(3):
        gd_step(original, m_star, [lr] * 3)
        gd_step(compressed, m_star, [lr] * 3)
    w1, w2, w3 = (layer.weight for layer in original.layers)
    c1, c2, c3 = (layer.weight for layer in compressed.layers)
    torch.testing.assert_close(c1, w1[:width])            # rows of the hidden subspace
    torch.testing.assert_close(c2, w2[:width, :width])
    torch.testing.assert_close(c3, w3[:, :width])
    u, _, vh = torch.linalg.svd(m_star)
    pu, pv = u[:, :width] @ u[:, :width].T, vh[:width].T @ vh[:width]
    torch.testing.assert_close(compressed.end_to_end(), pu @ original.end_to_end() @ pv)
    # and the step moved both networks (a test that can fail)
    assert (c1 - eps * vh[:width]).abs().max() > 1e-3


# -- training runs -----------------------------------------------------------------------------

def test_incremental_learning_order_is_detected(tmp_path):
    metrics = run(compose_cfg(SMALL_FACTORIZATION, tmp_path, tmp_path / "run"))
    assert metrics["train/learned_in_order"] == 1
    learned = [metrics[f"train/learn_step_s{i}"] for i in range(3)]
    predicted = [metrics[f"train/predicted_step_s{i}"] for i in range(3)]
    assert 0 < learned[0] < learned[1] < learned[2]
    for t, t_hat in zip(learned, predicted):            # t_i ~ 1/(lr sigma_i eps)
        assert 0.5 < t / t_hat < 4, (learned, predicted)
    # each layer changed in a 2r-dimensional subspace; d - 2r singular values stay at eps
    assert [metrics[f"train/update_rank_l{i}"] for i in range(3)] == [6, 6, 6]
    assert [metrics[f"train/at_eps_l{i}"] for i in range(3)] == [20 - 6] * 3
    assert metrics["test/recovery_mse"] < 1e-8
    record = json.loads((tmp_path / "run" / "train_trajectory.json").read_text())
    assert record["step"] == list(range(601))
    assert all(b >= a for a, b in zip(record["time_s"], record["time_s"][1:]))


def test_every_layer_update_has_rank_2r_at_the_default_eps(tmp_path):
    # eps 1e-2: in the first and last layers the second r updated directions are only a few
    # 1e-6 of the largest change (with the old rank_rtol 1e-5 they counted r, not 2r); the
    # d - 2r uniformly shrunk directions stay near 1e-9
    overrides = ["experiment=dln_factorization", "dataset.datamodule.d=20",
                 "dataset.datamodule.r=2", "method.stages.train.max_steps=1500",
                 "method.stages.train.optim.lr=8", "method.stages.train.diag_every=1500",
                 "method.stages.train.callbacks=[]", "threads=1"]
    metrics = run(compose_cfg(overrides, tmp_path, tmp_path / "run"))
    assert metrics["train/final_recovery_mse"] < 1e-10
    assert [metrics[f"train/update_rank_l{i}"] for i in range(3)] == [4, 4, 4]
    assert [metrics[f"train/at_eps_l{i}"] for i in range(3)] == [20 - 4] * 3


def test_outer_layer_updates_have_a_small_second_block():
    """Plain GD on the same factorization: each W_l - W_l(0) has 2r singular values well
    above the flat d - 2r tail, but the outer layers' second r sit at ~1e-5..5e-6 of the
    largest (so a 1e-5 threshold reads rank ~r there)."""
    torch.manual_seed(0)
    d, r, eps, lr = 20, 2, 1e-2, 8.0
    m_star = spread_low_rank_target(d, r, 0)
    net = DeepLinearNetwork([d, d, d, d], init_scale=eps)
    initial = [layer.weight.detach().clone() for layer in net.layers]
    weights = [layer.weight for layer in net.layers]
    for _ in range(1500):
        loss = 0.5 * (net.end_to_end() - m_star).pow(2).mean()
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.sub_(g, alpha=lr)
    for i, (w, w0) in enumerate(zip(weights, initial)):
        s = torch.linalg.svdvals(w.detach() - w0)
        rel = s / s[0]
        assert rel[2 * r - 1] > 1e-6 and rel[2 * r] < 1e-8      # 2r directions, then the tail
        assert dln.update_rank(w.detach(), w0) == 2 * r
        second = rel[r:2 * r]
        assert (second.max() < 3e-5) if i in (0, 2) else (second.min() > 1e-4), (i, second)


def test_compressed_completion_stops_at_the_loss_threshold(tmp_path):
    overrides = ["experiment=dln_completion", "method=dln_compressed", "dataset.datamodule.d=30",
                 "dataset.datamodule.r=2", "dataset.datamodule.p=0.5",
                 "method.stages.train.callbacks=[]", "method.stages.train.stop_loss=1e-9",
                 "method.alpha=1",  # alpha 5 overshoots into a rank-4 fit at this tiny size
                 "save_model=true", "threads=1"]
    metrics = run(compose_cfg(overrides, tmp_path, tmp_path / "run"))
    assert metrics["compress/width"] == 4
    assert metrics["params/compressed"] == dln.compressed_params(30, 30, 4, 3)
    assert metrics["train/final_loss"] < 1e-9 < metrics["dense/test_loss"]
    assert metrics["train/steps"] < 50000
    record = json.loads((tmp_path / "run" / "train_trajectory.json").read_text())
    assert record["loss"][-2] >= 1e-9 > record["loss"][-1]
    assert metrics["test/recovery_mse"] < 1e-6
    from compresslab import load_compressed

    reloaded = load_compressed(tmp_path / "run" / "compressed")
    assert [layer.weight.shape for layer in reloaded.layers] == [(4, 30), (4, 4), (30, 4)]


def test_ratings_file_trains_through_the_pipeline(tmp_path):
    users, items = torch.arange(1, 13.0), torch.arange(1, 11.0)
    table = torch.outer(1 + users % 4, 1 + items % 3) / 2      # rank 1, ratings 0.5..6
    path = tmp_path / "ratings.csv"
    path.write_text("user,item,rating\n" + "".join(
        f"{u},{i},{table[u - 1, i - 1]:.1f}\n" for u in range(1, 13) for i in range(1, 11)
        if (u + i) % 5))                                      # 80% of the entries
    overrides = ["experiment=dln_completion", "method=dln_compressed", "dataset=ratings",
                 f"dataset.path={path}", "dataset.datamodule.r=1", "method.alpha=1",
                 "model.source.init_scale=0.1", "method.stages.train.optim.lr=0.3",
                 "method.stages.train.max_steps=3000", "method.stages.train.callbacks=[]"]
    metrics = run(compose_cfg(overrides, tmp_path, tmp_path / "run"))
    assert metrics["params/compressed"] == dln.compressed_params(12, 10, 2, 3)
    assert metrics["train/final_loss"] < 1e-6 * metrics["dense/test_loss"]
    assert metrics["test/recovery_mse"] < 1e-4 * metrics["dense/test_recovery_mse"]


@pytest.mark.parametrize("override, message", [
    ("method.stages.train.optim.momentum=0.9", "plain gradient descent"),
    ("method.stages.train.alpha=0", "alpha must be positive"),
    ("method.stages.compress.width=40", "width 40 must be in"),
])
def test_bad_settings_stop_before_work(tmp_path, override, message):
    cfg = compose_cfg(["experiment=dln_completion", "method=dln_compressed",
                       "dataset.datamodule.d=30", override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run").exists()


# -- nonlinear: an MLP whose last layers are a deep linear block -------------------------------

@pytest.mark.parametrize("head, head_weights", [
    ([], 256 * 10),                                                    # plain MLP
    (["model.source.head_depth=3"], 2 * 256 * 256 + 256 * 10),         # + DLN head
    (["model.source.head_depth=3", "model.source.head_width=20"],      # + compressed head
     256 * 20 + 20 * 20 + 20 * 10),
])
def test_mlp_variants_train_on_digits(tmp_path, head, head_weights):
    overrides = ["experiment=dln_nonlinear", "method.stages.train.max_steps=40", *head]
    metrics = run(compose_cfg(overrides, tmp_path, tmp_path / "run"))
    body = 64 * 256 + 256 + 256 * 256 + 256
    assert metrics["params/compressed"] == body + head_weights
    assert metrics["test/acc"] > 0.6 > metrics["dense/test_acc"]      # learned from chance
