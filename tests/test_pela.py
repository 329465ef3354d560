"""PELA: decomposition, feature distillation, weight-perturbation regularisation, end to end."""

import copy
import csv

import pytest
import torch
from omegaconf import OmegaConf

from compresslab.compress.decomposer import PlainSVD
from compresslab.compress.pela import (
    Frobenius,
    MaxEntry,
    feature_distillation_loss,
    rank_from_c,
    ratio_from_c,
    weight_perturbation_loss,
)
from compresslab.compress.ratio import rank_for_ratio
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.layers.lowrank import LowRankLinear
from compresslab.models.architecture import adapter_for
from compresslab.models.llama import TinyLlama
from compresslab.models.vit import TinyViT
from compresslab.pipeline import run
from compresslab.stages.base import RunContext
from compresslab.stages.optim import OptimConfig
from compresslab.stages.pela import PelaDecomposeStage, PelaModule, low_rank_originals
from compresslab.tasks import ClassificationTask, LanguageModelingTask
from conftest import TINY_LLAMA, TINY_VIT, compose_cfg, read_metrics, run_cli

VIT_SPEC = DataSpec("image", num_classes=10, image_size=8, channels=1)
LLAMA_SPEC = DataSpec("text", vocab_size=64)


def tiny_vit():
    torch.manual_seed(0)
    return TinyViT(patch_size=2, embed_dim=32, depth=2, num_heads=4).build(VIT_SPEC).eval()


def tiny_llama():
    torch.manual_seed(0)
    return TinyLlama(hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=48).build(LLAMA_SPEC).eval()


def decompose(model, **kwargs):
    ctx = RunContext(cfg=OmegaConf.create({"progress": False}), run_dir=None,
                     adapter=adapter_for(model), data=None)
    stage = PelaDecomposeStage(PlainSVD(), omit=["norm", "head", "patch_embed"], **kwargs)
    stage.name = "decompose"
    return stage.run(model, ctx), ctx


@pytest.mark.parametrize("build,inputs", [
    (tiny_vit, lambda: torch.rand(4, 1, 8, 8)),
    (tiny_llama, lambda: torch.randint(0, 64, (2, 12))),
], ids=["vit", "llama"])
def test_full_rank_decomposition_reproduces_the_model(build, inputs):
    model = build()
    x = inputs()
    adapter = adapter_for(model)
    with torch.no_grad():
        before = adapter.logits(model, x)
    full = min(min(lin.in_features, lin.out_features)
               for lin in adapter.compressible_linears(model).values())
    model, ctx = decompose(model, rank=full)
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(low_rank) == len(adapter.blocks(model)) * len(
        adapter.block_linears(adapter.blocks(model)[0])) == len(ctx.plan)
    with torch.no_grad():
        after = adapter.logits(model, x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_decomposition_keeps_omitted_and_narrow_layers_dense():
    model, ctx = decompose(tiny_vit(), ratio=0.5, min_out_features=100)
    # width 32: qkv has 96 outputs, proj and fc2 32, fc1 128 -> only fc1 reaches 100
    assert sorted({name.split(".")[-1] for name in ctx.plan}) == ["fc1"]
    model, ctx = decompose(tiny_vit(), ratio=0.5, min_out_features=10)
    assert not any(t in name for name in ctx.plan for t in ("head", "patch_embed", "norm"))
    assert {name.split(".")[-1] for name in ctx.plan} == {"qkv", "proj", "fc1", "fc2"}


def test_pela_c_maps_to_ratio():
    assert ratio_from_c(2.0) == pytest.approx(0.5)
    assert ratio_from_c(1.5) == pytest.approx(1 / 3)


def test_rank_from_c_is_the_authors_integer_division():
    # 288 x 96 (a 96-wide ViT's qkv): 27648 // (3 * 384) = 24; the float route gives 23
    assert rank_from_c(96, 288, 3) == 24 and rank_from_c(96, 288, 6) == 12
    assert rank_for_ratio(96, 288, ratio_from_c(3)) == 23
    assert rank_from_c(32, 128, 2.5) == 4096 // 400     # 10, a fractional c stays exact
    with pytest.raises(ConfigError, match="larger than 1"):
        rank_from_c(32, 32, 1)


def test_decompose_with_c_uses_the_authors_rank():
    model, ctx = decompose(tiny_vit(), c=3)   # width 32: qkv 96x32, proj 32x32, fc1/fc2 128
    ranks = {name.split(".")[-1]: entry["rank"] for name, entry in ctx.plan.items()}
    assert ranks == {"qkv": 96 * 32 // (3 * 128), "proj": 32 * 32 // (3 * 64),
                     "fc1": 128 * 32 // (3 * 160), "fc2": 128 * 32 // (3 * 160)}
    stage = PelaDecomposeStage(PlainSVD(), c=3, rank=4)
    stage.name = "decompose"
    with pytest.raises(ConfigError, match="either c or rank"):
        stage.check(model, ctx)


@pytest.mark.parametrize("setting,weight,eps", [("deit", 0.0, 1e-3), ("swin", 1.0, 0.0)])
def test_wpr_settings_of_the_authors_scripts(setting, weight, eps, tmp_path):
    from compresslab.stages.pela import PelaPretrainStage

    stage = PelaPretrainStage(wpr_setting=setting, wpr_weight=0.5, wpr_eps=0.5, max_steps=1)
    assert (stage.wpr_weight, stage.wpr_eps) == (weight, eps)
    cfg = compose_cfg(["method=pela", f"method.wpr={setting}", *TINY_VIT], tmp_path)
    assert cfg.method.stages.pretrain.wpr_setting == setting


def pela_module(model, teacher, task, **weights):
    settings = dict(fd_weight=1.0, wpr_weight=1.0, wpr_eps=0.0, wpr_form_name="max_entry",
                    features="blocks")
    settings.update(weights)
    return PelaModule(model, adapter_for(model), task, OptimConfig(), 10, teacher=teacher,
                      originals=low_rank_originals(model, teacher), **settings)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("build,task,batch", [
    (tiny_vit, ClassificationTask(), lambda: (torch.rand(4, 1, 8, 8), torch.arange(4))),
    (tiny_llama, LanguageModelingTask(), lambda: torch.randint(0, 64, (2, 12))),
], ids=["vit", "llama"])
def test_feature_distillation_is_zero_when_student_is_teacher(build, task, batch):
    teacher = build()
    student = copy.deepcopy(teacher)
    module = pela_module(student, teacher, task, wpr_weight=0.0)
    module.train()
    assert student.training and not teacher.training  # the teacher stays in eval mode
    student.eval()  # compare the two without dropout noise
    calls = count_forwards(student)
    data = batch()
    task_loss = module.task_loss(data)
    losses = module.extra_losses(data)
    assert calls[0] == 1  # one student forward gives logits and block features
    assert float(losses["fd"]) == 0.0 and float(task_loss) > 0
    assert len(module.capture.block_outputs) == len(adapter_for(student).blocks(student))
    with torch.no_grad():  # a changed student is penalised
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module.task_loss(data)
    assert float(module.extra_losses(data)["fd"]) > 1e-4


def test_feature_distillation_final_uses_the_last_block_only():
    s = [torch.zeros(2, 3), torch.ones(2, 3)]
    t = [torch.ones(2, 3), torch.ones(2, 3) * 3]
    from compresslab.compress.pela import FinalFeatures

    assert float(feature_distillation_loss(s, t)) == pytest.approx((1 + 4) / 2)
    assert float(feature_distillation_loss(s, t, FinalFeatures())) == pytest.approx(4.0)


def toy_layer():
    layer = LowRankLinear(3, 4, 2, bias=False)
    with torch.no_grad():
        layer.second.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1]]))
        layer.first.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]))
    original = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0], [1.0, 3.0, -1.0],
                             [0.5, 0.0, 1.0]])
    return layer, original


def test_wpr_matches_a_hand_computation_and_reaches_only_the_worst_entry():
    layer, original = toy_layer()
    # B A = [[1,2,0],[0,1,-1],[1,3,-1],[0.5,0,1]]: the residual's only non-zero entry is
    # (0, 2) = -0.5, so the worst |entry| is 0.5
    eps = 0.1
    loss = weight_perturbation_loss([(layer.dense_weight(), original)], eps=eps)
    assert float(loss) == pytest.approx((0.5 - eps) ** 2)
    loss.backward()
    # dL/d(BA) = 2 (0.5 - eps) * sign(-0.5) at (0, 2) only, so B's grad lives in row 0 and
    # A's grad in column 2
    g = 2 * (0.5 - eps) * -1.0
    b, a = layer.second.weight, layer.first.weight
    expected_b = torch.zeros_like(b)
    expected_b[0] = g * a.detach()[:, 2]
    expected_a = torch.zeros_like(a)
    expected_a[:, 2] = g * b.detach()[0]
    torch.testing.assert_close(b.grad, expected_b)
    torch.testing.assert_close(a.grad, expected_a)


def test_wpr_gradient_on_the_product_is_one_hot_and_layers_are_averaged():
    torch.manual_seed(0)
    products = [torch.randn(5, 4, requires_grad=True) for _ in range(2)]
    originals = [torch.randn(5, 4) for _ in range(2)]
    loss = weight_perturbation_loss(list(zip(products, originals)), eps=0.0, form=MaxEntry())
    worst = [(p - o).abs().max() for p, o in zip(products, originals)]
    assert float(loss) == pytest.approx(float(sum(w**2 for w in worst) / 2), rel=1e-6)
    loss.backward()
    for p in products:
        assert int((p.grad != 0).sum()) == 1
    smooth = weight_perturbation_loss([(products[0], originals[0])], form=Frobenius())
    products[0].grad = None
    smooth.backward()
    assert int((products[0].grad != 0).sum()) == products[0].numel()


def test_pela_run_py_end_to_end_writes_metrics(shared_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["method=pela", "method.ratio=0.5", "logger=csv", "progress=false",
                      "method.stages.pretrain.max_steps=6", "method.stages.finetune.max_steps=4",
                      "method.stages.pretrain.callbacks.0.every_n_steps=2",
                      "method.stages.pretrain.log_every=1",
                      f"paths.root={shared_root}", f"hydra.run.dir={run_dir}", *TINY_VIT])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    for key in ("test/acc", "dense/test_acc", "params/compressed", "decompose/params_ratio",
                "pretrain/time_s", "finetune/time_s", "pretrain/steps",
                "after_decompose/test_acc", "after_pretrain/test_acc"):
        assert key in metrics, key
    assert metrics["pretrain/steps"] == 6 and metrics["finetune/steps"] == 4
    assert abs(metrics["decompose/params_ratio"] - 0.5) <= 0.01
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v not in ("", None)}
    assert {"pretrain/train/loss_task", "pretrain/train/loss_fd",
            "pretrain/train/loss_wpr"} <= logged
    fd = [float(r["pretrain/train/loss_fd"]) for r in rows if r.get("pretrain/train/loss_fd")]
    assert fd and all(v >= 0 for v in fd) and max(fd) > 0
    assert (run_dir / "pretrain_singular_values.png").is_file()
    assert (run_dir / "pretrain_singular_values.json").is_file()


@pytest.mark.slow
def test_pela_runs_on_llama(shared_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["method=pela", "method.ratio=0.5", "logger=none", "progress=false",
                      "method.stages.pretrain.max_steps=3", "method.stages.finetune.max_steps=2",
                      f"paths.root={shared_root}", f"hydra.run.dir={run_dir}", *TINY_LLAMA])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["pretrain/steps"] == 3 and "test/ppl" in metrics
    assert metrics["params/compressed"] < metrics["params/dense"]


def test_pela_bad_option_gets_one_line_and_exit_2(tmp_path):
    result = run_cli(["method=pela", "method.stages.pretrain.wpr_form=l2", *TINY_VIT,
                      f"paths.root={tmp_path}", "logger=none", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown PELA wpr_form 'l2' (max_entry | frobenius)" in lines[0]
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("arg,message", [
    ("method.stages.pretrain.features=tokens", "unknown PELA features 'tokens'"),
    ("method.stages.pretrain.fd_weight=-1", "fd_weight must be >= 0"),
    ("method.stages.pretrain.wpr_eps=-0.1", "wpr_eps must be >= 0"),
    ("method.wpr=vit", "wpr_setting must be deit | swin or null"),
    ("method.c=1", "c must be larger than 1"),
    ("method.stages.after_decompose.splits=[dev]", "splits must be among train, val, test"),
])
def test_pela_bad_options_fail_before_work(arg, message, tmp_path):
    cfg = compose_cfg(["method=pela", arg, *TINY_VIT], tmp_path)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "base").exists()


def test_pretrain_without_fd_and_wpr_is_plain_training_without_teacher():
    from compresslab.stages.modules import TrainModule
    from compresslab.stages.pela import PelaPretrainStage

    model, ctx = decompose(tiny_vit(), ratio=0.5)
    ctx.data = type("Data", (), {"task": ClassificationTask()})()
    stage = PelaPretrainStage(fd_weight=0.0, wpr_weight=0.0, max_steps=3)
    assert not stage.needs_dense_copy
    module = stage.make_module(model, ctx)
    assert type(module) is TrainModule and module.extra_losses(None) == {}
    ctx.teacher = tiny_vit()  # the dense original
    full = PelaPretrainStage(max_steps=3)
    assert full.needs_dense_copy and isinstance(full.make_module(model, ctx), PelaModule)
