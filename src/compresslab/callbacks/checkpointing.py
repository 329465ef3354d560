"""Checkpoints of a trained stage and the per-step seed that makes resuming exact."""

from __future__ import annotations

import logging
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from compresslab.filesystem import partial_file
from compresslab.sharding import local_values

log = logging.getLogger(__name__)


class StageCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_steps`` optimiser steps and, with
    ``save_on_end``, when training ends (so a finished phase of a stage with several fits
    is not trained again; a single-fit stage saves its whole state when it finishes).

    Differences from a plain ``ModelCheckpoint(save_last=True)``: the file is replaced
    atomically (a run killed while saving keeps the previous checkpoint); a step at which
    validation runs is saved after the validation (so a resumed run does not skip it); a
    save is skipped while any parameter is NaN/Inf; steps may advance by more than one per
    batch (manual optimisation counting several gradient steps). ``good_step`` and
    ``last_model_path`` name the last checkpoint written.
    """

    def __init__(self, dirpath, every_n_steps: int, val_every: int | None = None,
                 save_on_end: bool = True):
        super().__init__(dirpath=dirpath, filename="last", save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_steps, enable_version_counter=False)
        self.every, self.val_every, self.save_on_end = int(every_n_steps), val_every, save_on_end
        self.good_step: int | None = None
        self._after_validation = False

    @property
    def state_key(self) -> str:
        return "StageCheckpoint"

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # resumed: that step is saved

    def _due(self, trainer) -> bool:
        return (trainer.global_step // self.every > self._last_global_step_saved // self.every
                and not self._should_skip_saving_checkpoint(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._due(trainer):
            return
        if self.val_every and trainer.global_step % self.val_every == 0 \
                and trainer.enable_validation:
            self._after_validation = True
            return
        self.save(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self._after_validation:
            self._after_validation = False
            self.save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        pass

    def on_train_end(self, trainer, pl_module):
        if self.save_on_end and self._last_global_step_saved != trainer.global_step:
            self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        # under FSDP each process checks its shard; all must agree (saving is collective)
        finite = all(bool(torch.isfinite(local_values(p)).all()) for p in pl_module.parameters())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            log.warning("step %d: parameters are not finite; checkpoint not saved",
                        trainer.global_step)
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.good_step = trainer.global_step

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        with partial_file(tmp, filepath):  # a full disk leaves no half-written .tmp
            trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


class StepSeed(L.Callback):
    """Seeds torch's global generator before every training step from (seed, step):
    dropout and any other randomness of step ``k`` is the same in a resumed run."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from compresslab.seeding import derive_seed

        torch.manual_seed(derive_seed(self.seed, "step", trainer.global_step))
