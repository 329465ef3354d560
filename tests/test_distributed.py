"""Several processes for one run: DDP and FSDP on CPU (gloo) give the one-process numbers,
FSDP's sharded model is gathered back whole after each Lightning call, only the main
process writes, evaluation counts every example once, and the GPU/SLURM configs
compose into what Lightning and SLURM expect.

Fair comparison: DDP splits every step's batch between the processes (rank r takes the
r-th part of the step's slice of the data order), so 2 processes with
``batch_size=B/2`` train on exactly the batches one process sees with ``batch_size=B``;
DDP averages the two half-batch gradients, which is the full-batch mean. What differs is
only the order of floating-point sums, hence "the same" means equal up to ~1e-5 relative
(measured: ~1e-7 on the tiny models). With the same ``batch_size`` in both, DDP would
train on twice the data per step: a different run, not a check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from compresslab import distributed
from conftest import CONFIGS, QUIET, REPO, TINY_LLAMA, TINY_VIT, compose_cfg, read_metrics

# -- evaluation shards ---------------------------------------------------------------------

@pytest.mark.parametrize("size,world", [(181, 2), (180, 2), (7, 3), (1, 2), (0, 2)])
def test_eval_shards_count_every_example_once(size, world, monkeypatch):
    seen = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world", lambda r=rank: (r, world))
        sampler = distributed.EvalShardSampler(size)
        assert len(list(sampler)) == len(sampler)
        seen += list(sampler)
    if size >= world:
        assert sorted(seen) == list(range(size))   # no example repeated, none dropped
    else:  # fewer examples than processes: each process still gets a batch
        assert set(seen) == set(range(size)) and len(seen) == (world if size else 0)


def test_shard_eval_loader_wraps_batched_sequential_loaders_only():
    data = TensorDataset(torch.arange(10.0))
    loader = distributed.shard_eval_loader(DataLoader(data, batch_size=4))
    assert isinstance(loader.sampler, distributed.EvalShardSampler)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    full_batch = DataLoader(data, batch_size=None)
    assert distributed.shard_eval_loader(full_batch) is full_batch


# -- who writes ----------------------------------------------------------------------------

def test_only_the_main_process_writes_results_and_figures(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.pipeline import write_results
    from compresslab.report import save_figure
    from compresslab.stages.base import RunContext

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cfg = compose_cfg(TINY_VIT, tmp_path)
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", adapter=None, data=None,
                     metrics={"test/acc": 0.5}, plan={"x": {"kind": "lowrank"}})
    (tmp_path / "run").mkdir()
    write_results(cfg, ctx, torch.nn.Linear(2, 2), data=None)
    save_figure(plt.figure(), tmp_path / "run" / "f.png")
    assert list((tmp_path / "run").iterdir()) == []


def test_base_model_cache_is_written_by_the_main_process_only(tmp_path, monkeypatch):
    """The main process trains and writes the cache (its marker tells the others to join
    the training); another process never takes the lock, waits for the marker or the
    cache, trains along or loads, and writes nothing."""
    from hydra.utils import instantiate

    from compresslab.base_cache import base_key, build_base_model

    cfg = compose_cfg(TINY_VIT, tmp_path)
    source, data = instantiate(cfg.model.source), instantiate(cfg.dataset.datamodule)
    base = Path(cfg.paths.base)
    trained = []

    def pretrain(model):
        trained.append(distributed.rank())
        listing = sorted(p.name for p in base.iterdir())
        assert any(n.endswith(".training") for n in listing), listing  # the marker
        return {"val/acc": 0.5}

    monkeypatch.setattr(rank_zero_only, "rank", 1)          # cold cache, main marker written
    base.mkdir(parents=True)
    folder = f"{cfg.model.family}-digits-{base_key(cfg, cfg.dataset, data)}"
    (base / f"{folder}.training").write_text(str(cfg.run_dir))
    build_base_model(cfg, source, data, pretrain)
    assert trained == [1] and not (base / folder).exists()   # trained along, wrote nothing
    assert not (base / f"{folder}.lock").exists()

    monkeypatch.setattr(rank_zero_only, "rank", 0)          # the main process writes
    (base / f"{folder}.training").unlink()
    model, record = build_base_model(cfg, source, data, pretrain)
    assert trained == [1, 0] and (base / folder / "base.json").is_file()
    assert not (base / f"{folder}.training").exists()

    monkeypatch.setattr(rank_zero_only, "rank", 1)          # warm cache: both load it
    before = sorted(p.name for p in base.rglob("*"))
    _, record = build_base_model(cfg, source, data, pretrain)
    assert record["cached"] and trained == [1, 0]
    assert sorted(p.name for p in base.rglob("*")) == before


# -- Hydra: the command line the other processes re-run -------------------------------------

def test_multirun_job_pins_the_relaunch_command_to_itself(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["method.ratio=0.3", "trainer=ddp_cpu"],
                      return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.mode = RunMode.MULTIRUN
    cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "0_job")
    OmegaConf.set_readonly(cfg.hydra, True)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["run.py", "-m", "method.ratio=0.3,0.5", "trainer=ddp_cpu"])
    monkeypatch.delenv("MASTER_PORT", raising=False)
    try:
        distributed.pin_job_for_relaunch(str(REPO / "run.py"))
        assert sys.argv == [str(REPO / "run.py"), "method.ratio=0.3", "trainer=ddp_cpu"]
        assert HydraConfig.get().run.dir == str(tmp_path / "sweep" / "0_job")
        os.environ["MASTER_PORT"] = "12345"   # what Lightning's launcher leaves behind
        distributed.end_job()
        assert "MASTER_PORT" not in os.environ
    finally:
        HydraConfig.instance().cfg = None


# -- FSDP: shard, then gather back whole ----------------------------------------------------

def _shard_gather_worker(rank: int, world: int, port: int) -> None:
    """One process of the round trip: a tiny LLaMA (tied embeddings, a frozen weight, a
    vocabulary that does not split evenly) sharded, trained one step (gradients on the
    shards), gathered; then sharded and gathered again (the next stage)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from compresslab import sharding
    from compresslab.models.architecture import adapter_for

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        classes = {n: type(m) for n, m in model.named_modules()}
        modules = dict(model.named_modules())
        attributes = {n: set(m.__dict__) for n, m in model.named_modules()}
        x = torch.randint(0, 37, (2, 5))
        out = model(x).logits.detach()
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        for _ in range(2):
            sharding.shard(model, adapter_for(model), mesh["data_parallel"])
            assert sharding.is_sharded(model)
            assert type(model.model.layers[0]).__name__ == "FSDPLlamaDecoderLayer"
            assert model.model.embed_tokens.weight.to_local().shape[0] < 37
            model(x).logits.sum().backward()
            assert sharding.gather(model) is model
            assert not sharding.is_sharded(model)
            assert {n: type(m) for n, m in model.named_modules()} == classes
            assert all(m is modules[n] for n, m in model.named_modules())  # same objects
            after = model.state_dict()
            assert after.keys() == before.keys()
            assert all(torch.equal(after[k], before[k]) for k in before), rank
            assert not any(isinstance(t, DTensor) for t in (*model.parameters(),
                                                            *model.buffers()))
            assert all(type(p) is torch.nn.Parameter for p in model.parameters())
            assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
            assert model.model.layers[1].mlp.up_proj.weight.requires_grad
            assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
            for n, m in model.named_modules():  # no FSDP hooks, state or flags left
                assert not (m._forward_hooks or m._forward_pre_hooks or m._state_dict_pre_hooks
                            or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks)
                assert set(m.__dict__) == attributes[n], (n, set(m.__dict__) ^ attributes[n])
            assert torch.equal(model(x).logits, out)
    finally:
        dist.destroy_process_group()


def test_shard_then_gather_gives_back_the_same_plain_model():
    """:func:`compresslab.sharding.gather` undoes :func:`shard` exactly, in place, over a
    2-process gloo group (CPU)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_shard_gather_worker, args=(2, port), nprocs=2)


# -- configs for GPU clusters ---------------------------------------------------------------

def _compose(overrides: list[str], hydra: bool = False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def test_trainer_configs_build_their_strategies():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    ddp_cpu = _compose(["trainer=ddp_cpu"]).trainer
    strategy = instantiate(ddp_cpu.strategy)
    assert isinstance(strategy, DDPStrategy) and strategy._process_group_backend == "gloo"
    assert (ddp_cpu.accelerator, ddp_cpu.devices) == ("cpu", 2)
    ddp = _compose(["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"]).trainer
    assert (ddp.accelerator, ddp.strategy, ddp.devices, ddp.num_nodes) == ("gpu", "ddp", 8, 4)
    fsdp = _compose(["trainer=fsdp"]).trainer
    strategy = instantiate(fsdp.strategy)
    # FSDP2 through Lightning: pure data parallelism over every process, full checkpoints
    assert isinstance(strategy, ModelParallelStrategy) and fsdp.accelerator == "gpu"
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("all", 1)
    assert strategy._save_distributed_checkpoint is False and fsdp.precision == "bf16-mixed"
    fsdp_cpu = _compose(["trainer=fsdp_cpu"]).trainer
    strategy = instantiate(fsdp_cpu.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._process_group_backend == "gloo" and strategy._save_distributed_checkpoint \
        is False and (fsdp_cpu.accelerator, fsdp_cpu.devices, fsdp_cpu.precision) == \
        ("cpu", 2, "32-true")


def test_slurm_launcher_asks_for_one_task_per_gpu(tmp_path):
    """``hydra/launcher=slurm`` composes into the sbatch header SLURM gets (submitit)."""
    from unittest import mock

    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm import slurm

    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                    "trainer.num_nodes=4", "hydra.launcher.partition=gpu"], hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    with mock.patch("shutil.which", return_value="/usr/bin/srun"):  # no SLURM here
        executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path,
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    header = slurm._make_sbatch_string(command="python run.py", folder=str(tmp_path),
                                       **executor._executor.parameters)
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--time=240"):
        assert f"#SBATCH {line}" in header, header
    unset = _compose(["hydra/launcher=slurm", "trainer=ddp"], hydra=True)  # devices: -1
    with pytest.raises(Exception, match="needs trainer.devices set to the number of GPUs"):
        OmegaConf.to_container(unset.hydra.launcher, resolve=True)


# -- end to end: two CPU processes against one ----------------------------------------------

PELA_LLAMA = [*TINY_LLAMA, "dataset.datamodule.max_eval_blocks=15",   # odd: shards differ
              "model.pretrain.optim.warmup_steps=4", "model.pretrain.val_every=20",
              "method=pela", "method.stages.pretrain.max_steps=12",
              "method.stages.pretrain.optim.warmup_steps=2", "method.stages.finetune.max_steps=8",
              "method.stages.finetune.optim.warmup_steps=2",
              "method.stages.pretrain.callbacks.0.every_n_steps=4", "threads=1", *QUIET]


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and "wandb" not in p.parts and ".hydra" not in p.parts}


def _matches_one_process(tmp_path: Path, args: list[str], env: dict) -> tuple[Path, Path]:
    """PELA in one process and with ``args`` (two processes, 8 examples each: the same
    global batch of 16); the metrics agree, and the two-process run writes the same files
    but the second process's (empty) Hydra log. Returns both run roots."""
    one, two = tmp_path / "one", tmp_path / "two"
    result = _run([*PELA_LLAMA, "trainer=cpu", f"paths.root={one}",
                   f"hydra.run.dir={one}/run"], env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run([*PELA_LLAMA, *args, "dataset.datamodule.batch_size=8",
                   f"paths.root={two}", f"hydra.run.dir={two}/run"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_metrics(one / "run"), read_metrics(two / "run")
    compared = [k for k in a if (k.startswith(("test/", "dense/", "base/", "after_", "params/"))
                                 or k.endswith("/steps") or "/val_" in k) and "time" not in k]
    assert len(compared) > 15
    for key in compared:
        assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a[key], b[key])
    info = json.loads((two / "run" / "run_info.json").read_text())
    assert info["processes"] == 2 and json.loads(
        (one / "run" / "run_info.json").read_text())["processes"] == 1
    assert _files(two / "run") == _files(one / "run") | {"train_ddp_process_1.log"}
    unkeyed = lambda files: {re.sub(r"-[0-9a-f]{12}", "-KEY", f) for f in files}  # batch: key
    assert unkeyed(_files(two / "base")) == unkeyed(_files(one / "base"))
    return one, two


@pytest.mark.slow
def test_ddp_cpu_matches_one_process_and_only_rank_0_writes(tmp_path):
    # W&B offline: one run, from rank 0
    _, two = _matches_one_process(
        tmp_path, ["trainer=ddp_cpu", "logger=wandb"],
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_tmp")})
    assert len(list((two / "run" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_fsdp_cpu_matches_one_process_and_only_rank_0_writes(tmp_path):
    """trainer=fsdp_cpu (FSDP2, 2 processes): every trained stage and evaluation runs on
    the sharded model, which is gathered back whole between them; the numbers are those
    of one process (same batches, as under DDP), and only rank 0 writes. Slow (~75 s on
    2 busy cores: three runs of PELA, two of them in two processes), like its DDP twin;
    the fast suite keeps FSDP's shard/gather round trip
    (test_shard_then_gather_gives_back_the_same_plain_model)."""
    _matches_one_process(tmp_path, ["trainer=fsdp_cpu"], env={"WANDB_MODE": "disabled"})


@pytest.mark.slow
def test_ddp_cpu_multirun_runs_each_job_in_its_own_folder(tmp_path):
    """-m with the basic launcher: each job starts its own second process, re-running that
    job only, in that job's folder."""
    args = [*TINY_LLAMA, "method=svd", "method.ratio=0.3,0.5", "trainer=ddp_cpu", "threads=1",
            *QUIET, f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep"]
    result = _run(["-m", *args], env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("*_svd-*"))
    assert [j.name[:2] for j in jobs] == ["0_", "1_"]
    for job in jobs:
        assert (job / "metrics.json").is_file() and (job / "train_ddp_process_1.log").is_file()
        assert json.loads((job / "run_info.json").read_text())["processes"] == 2
    ratios = [read_metrics(j)["compress/params_ratio"] for j in jobs]
    assert ratios[0] == pytest.approx(0.3, abs=0.02) and ratios[1] == pytest.approx(0.5, abs=0.02)
