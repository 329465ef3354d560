"""Fully sharded data parallel (``trainer=fsdp``, ``fsdp_cpu``) for the stages of one run.

The pipeline hands one model from stage to stage, but FSDP changes it in place: torch's
``fully_shard`` (FSDP2) turns every parameter into a sharded ``DTensor``, hooks the forward
of each unit and swaps each unit's class for a dynamic ``FSDP<Class>`` subclass. So a
Lightning call under FSDP goes: the LightningModule's ``configure_model`` calls
:func:`shard` (blocks first, then the root, over the data-parallel mesh), Lightning fits or
tests, and the caller calls :func:`gather` afterwards, which makes the very same module
objects whole again: plain parameters with the full values, no FSDP hooks or state, the
original classes. The next stage, the evaluation and the saved model then see the model
exactly as they would after a one-process run.

Only the model is sharded: a frozen teacher (PELA's dense model, distillation targets)
stays whole in every process, like under DDP.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

#: instance attributes ``fully_shard`` sets on every module it manages (for Dynamo)
_MANAGED_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def _fsdp_classes():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def uses_fsdp(trainer) -> bool:
    """Whether ``trainer`` runs Lightning's ModelParallelStrategy (FSDP2 + device mesh)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    return isinstance(strategy, ModelParallelStrategy)


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an FSDP unit."""
    fsdp_module, _ = _fsdp_classes()
    return any(isinstance(m, fsdp_module) for m in model.modules())


def shard(model: nn.Module, adapter, mesh, *, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block of ``model`` (one FSDP unit each: the unit FSDP gathers
    at a time), then the root (embeddings, head, anything outside the blocks), over the
    1-D data-parallel ``mesh``. In place; returns ``model``.

    ``reshard_after_forward=False`` keeps each unit's parameters gathered from its forward
    until its backward: for modules whose loss reads parameters outside the forward pass
    (PELA's weight-perturbation term, spectrum gates), which then see plain tensors."""
    _, fully_shard = _fsdp_classes()
    for block in adapter.blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def configure(module, *, reshard_after_forward: bool = True) -> None:
    """Body of the LightningModules' ``configure_model``: shard ``module.model`` when the
    trainer runs FSDP (Lightning calls the hook once per fit/test); nothing otherwise, nor
    for a task that computes with the weights outside the forward pass
    (``task.shardable`` false: the deep linear nets stay whole in every process, as
    under DDP)."""
    if not uses_fsdp(module._trainer) or is_sharded(module.model):
        return
    if not getattr(getattr(module, "task", None), "shardable", True):
        return
    shard(module.model, module.adapter, module.device_mesh["data_parallel"],
          reshard_after_forward=reshard_after_forward)


def unshard(model: nn.Module) -> None:
    """All-gather the parameters of every FSDP unit of ``model`` now (they stay gathered
    until the unit's backward or :func:`gather`): code that reads parameters before the
    forward (e.g. spectrum's hard selection) sees plain tensors. No-op if not sharded."""
    fsdp_module, _ = _fsdp_classes()
    if not isinstance(model, fsdp_module):
        return
    model._get_fsdp_state()._lazy_init()  # the root must know it is the root (first step)
    for m in model.modules():
        if isinstance(m, fsdp_module):
            m.unshard()


def reshard(model: nn.Module) -> None:
    """Free what :func:`unshard` gathered: every FSDP unit of ``model`` holds its shard
    only again. No-op if not sharded."""
    fsdp_module, _ = _fsdp_classes()
    for m in model.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


@contextmanager
def unsharded(model: nn.Module):
    """Within the block, ``model``'s parameters are plain, whole tensors (gathered in
    every process, which must all enter the block); sharded again after it. For reading
    the model during a fit (callbacks sampling weights or gates). No-op if not sharded."""
    if not is_sharded(model):
        yield model
        return
    unshard(model)
    try:
        yield model
    finally:
        reshard(model)


def local_values(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: its shard if it is a DTensor, else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _fsdp_states(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(unit, FSDP state) of every FSDP unit of ``model``, one per ``fully_shard`` call."""
    fsdp_module, _ = _fsdp_classes()
    return [(m, m._get_fsdp_state()) for m in model.modules() if isinstance(m, fsdp_module)]


def _full_parameters(model: nn.Module) -> None:
    """Replace every DTensor parameter/buffer of ``model`` by a plain one with the full
    values (an all-gather: every process calls this in the same order). Tied parameters
    stay tied (one new Parameter per old one); gradients are dropped."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in done:
                    full = param.full_tensor().detach().clone()
                    done[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad)
                module._parameters[name] = done[id(param)]
        for name, buf in list(module._buffers.items()):
            if isinstance(buf, DTensor):
                if id(buf) not in done:
                    done[id(buf)] = buf.full_tensor().detach().clone()
                module._buffers[name] = done[id(buf)]


def _remove_fsdp_state(unit: nn.Module, state) -> None:
    """Undo what ``fully_shard`` registered for ``unit``: its forward (pre-)hooks, the
    state-dict hooks of its parameter groups, the composable-API state and registry entry
    and the module -> state mapping."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    # the forward hooks (one handle, or one multi-handle for a grouped fully_shard)
    for handle in {id(h): h for h in (getattr(state, "_pre_forward_hook_handle", None),
                                      getattr(state, "_post_forward_hook_handle", None))
                   if h is not None}.values():
        handle.remove()
    for group in getattr(state, "_fsdp_param_groups", []):
        for handles in (group._module_to_pre_save_state_dict_hook_handle,
                        group._module_to_pre_load_state_dict_hook_handle):
            for handle in handles.values():
                handle.remove()
            handles.clear()
        for fsdp_param in group.fsdp_params:
            if getattr(fsdp_param, "_post_load_hook_handle", None) is not None:
                fsdp_param._post_load_hook_handle.remove()
    for module in getattr(state, "_modules", (unit,)):
        _module_state_mapping.pop(module, None)
        states = module.__dict__.get(STATE_KEY)
        if isinstance(states, dict):
            for key in [k for k, v in states.items() if v is state]:
                del states[key]
            if not states:
                del module.__dict__[STATE_KEY]
        registry = module.__dict__.get(REGISTRY_KEY)
        if isinstance(registry, dict):
            registry.pop("fully_shard", None)
            if not registry:
                del module.__dict__[REGISTRY_KEY]


def _restore_class(unit: nn.Module) -> None:
    """``fully_shard`` set ``unit.__class__`` to ``FSDP<Cls>(FSDPModule, Cls)``: back to
    ``Cls`` (the class after FSDPModule in the MRO, as ``FSDPModule.__new__`` finds it)."""
    fsdp_module, _ = _fsdp_classes()
    cls = type(unit)
    if issubclass(cls, fsdp_module):
        unit.__class__ = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 2)]


def gather(model: nn.Module) -> nn.Module:
    """Make a sharded ``model`` a plain, whole module again, in place (the same module
    objects; the parameters are new Parameter objects holding the full values); returns
    it. Every process must call it (all-gathers). No-op for a model that is not sharded."""
    units = _fsdp_states(model)
    if not units:
        return model
    for unit, _ in units:  # sharded DTensors registered again (frees gathered copies)
        unit.reshard()
    _full_parameters(model)
    for unit, state in units:
        _remove_fsdp_state(unit, state)
        _restore_class(unit)
    for module in model.modules():
        for flag in _MANAGED_FLAGS:
            module.__dict__.pop(flag, None)
    return model


def _strategy_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FullyShardedStrategy(_strategy_base()):
    """Lightning's ModelParallelStrategy (FSDP2 over a device mesh) as the trainer configs
    use it: pure data parallelism, every process one shard (``data_parallel_size="all"``:
    nodes x devices per node, also with ``devices: -1``; tensor parallelism off), and
    checkpoints that hold the full state in one file (``save_distributed_checkpoint=False``:
    ``last.ckpt`` resumes on any number of processes). The LightningModules shard their
    model in ``configure_model`` (:func:`configure`)."""

    def __init__(self, data_parallel_size: int | str = "all", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size,
                         tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "all":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # A model left whole (``task.shardable`` false: the deep linear nets, trained without an
    # optimiser object) is checkpointed and restored the plain way, as under DDP: torch's
    # distributed state-dict functions need a sharded model and a real optimiser.

    def _sharded(self) -> bool:
        return self.model is not None and is_sharded(self.model)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return not self._sharded()

    def lightning_module_state_dict(self):
        if self._sharded():
            return super().lightning_module_state_dict()
        from lightning.pytorch.strategies import Strategy

        return Strategy.lightning_module_state_dict(self)

    def optimizer_state(self, optimizer):
        if self._sharded():
            return super().optimizer_state(optimizer)
        from lightning.pytorch.strategies import Strategy

        return Strategy.optimizer_state(self, optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        if self._sharded():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        from lightning.pytorch.strategies import Strategy

        return Strategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if not self._sharded():
            from lightning.pytorch.strategies import Strategy

            Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if not self._sharded():
            from lightning.pytorch.strategies import Strategy

            Strategy.load_optimizer_state_dict(self, checkpoint)
