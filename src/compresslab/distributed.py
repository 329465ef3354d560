"""Several processes for one run (``trainer=ddp_cpu``, ``ddp``, ``fsdp``).

Lightning starts the other processes of a node by re-running ``run.py`` with the same
command line plus ``hydra.run.dir=<this run's folder> hydra.output_subdir=null`` (under
SLURM, ``srun`` starts one process per task instead). Every process runs the whole
pipeline in step: the same seed builds the same model, the stages without Lightning
(SVD, pruning) compute the same result in each process, and the trained stages and the
evaluations are shared (DDP averages the gradients, FSDP shards the model for the call
and gathers it back whole after it, evaluation sums are added up over processes, each
example counted once). Only the main process (global rank 0) writes files
and logs; the others read what it writes (cached tokens, the cached base model).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

#: environment variables Lightning's launcher sets in the main process of a node
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def rank() -> int:
    """The global rank: from the process group once it exists, else from the launcher's
    environment (``LOCAL_RANK``, ``SLURM_PROCID``, ...), as Lightning reads it."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_main_process() -> bool:
    return rank() == 0


def world() -> tuple[int, int]:
    """(rank, number of processes) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_trainer(cfg) -> None:
    """A trainer that cannot work here: a GPU trainer on a machine without a GPU. (FSDP,
    ``trainer=fsdp``/``fsdp_cpu``, works: :mod:`compresslab.sharding`.)"""
    from compresslab.errors import ConfigError

    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but torch finds no GPU here; "
                          f"use trainer=cpu (one process) or trainer=ddp_cpu (several)")


def wait_for(ready, what: str, timeout_s: float = 6 * 3600, poll_s: float = 0.2) -> None:
    """Block a non-main process until ``ready()`` (the main process wrote ``what``)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank()}: gave up waiting for the main process to "
                               f"write {what}")
        time.sleep(poll_s)


def wait_for_file(path: Path, timeout_s: float = 6 * 3600) -> None:
    wait_for(Path(path).is_file, str(path), timeout_s)


class EvalShardSampler(DistributedSampler):
    """Evaluation order with every example exactly once over all processes: process ``r``
    of ``W`` takes examples ``r, r + W, r + 2W, ...`` (no padding, unlike Lightning's
    default ``DistributedSampler``, which repeats examples to even out the shards). A split
    with fewer examples than processes repeats its last example on the extra processes so
    that each process has a batch. The rank is read when iterating; with one process this
    is the plain sequential order. It subclasses DistributedSampler only so that
    Lightning keeps it under DDP."""

    def __init__(self, size: int):
        # no super().__init__(): that needs a process group
        self.size = int(size)
        self.epoch, self.shuffle, self.drop_last = 0, False, False

    def _indices(self) -> list[int]:
        r, w = world()
        if self.size and r >= self.size:
            return [self.size - 1]
        return list(range(r, self.size, w))

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def shard_eval_loader(loader: DataLoader) -> DataLoader:
    """``loader`` (sequential, batched) with an :class:`EvalShardSampler`; other loaders
    (full-batch, iterable, custom samplers) are returned as they are."""
    if loader.batch_size is None or not isinstance(loader.sampler, SequentialSampler):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=EvalShardSampler(len(loader.dataset)),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=False)


# -- Hydra multirun ---------------------------------------------------------------------------

_ENV_AT_JOB_START: dict[str, str | None] = {}


def pin_job_for_relaunch(script: str) -> None:
    """In a Hydra multirun, make the command line Lightning re-runs for the other processes
    run this job only, in this job's folder: ``sys.argv`` becomes ``script`` (``run.py``)
    with the job's own overrides (no ``-m``, no sweep lists) and ``hydra.run.dir`` this
    job's output folder (Lightning appends it to the command). Nothing changes for a
    single run."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    import __main__

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    _ENV_AT_JOB_START.clear()
    _ENV_AT_JOB_START.update({k: os.environ.get(k) for k in _LAUNCH_ENV})
    hc = HydraConfig.get()
    sys.argv = [str(Path(script).resolve()), *hc.overrides.task]
    if getattr(__main__, "__spec__", None) is not None:  # e.g. a joblib worker process:
        __main__.__spec__ = None  # Lightning then re-runs sys.argv[0], i.e. run.py
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir


def end_job() -> None:
    """After one job of a multirun: close the process group and restore the launch
    environment, so that the next job (same process) starts its own processes."""
    if not _ENV_AT_JOB_START:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in _ENV_AT_JOB_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_AT_JOB_START.clear()
