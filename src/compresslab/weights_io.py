"""Tensors to and from files: safetensors written atomically, foreign ``.pt`` files read
through ``torch.load(weights_only=True)`` only, and one-line errors for damaged files.

Nothing here knows about plans, stages or runs: model sources, the base-model cache,
checkpoints and resume all read and write tensors through this module."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compresslab.errors import ConfigError
from compresslab.filesystem import partial_file


def save_state(model: nn.Module, path: Path) -> None:
    """Tensors of ``model`` as safetensors (tied tensors stored once, written atomically)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    tmp = path.with_name(path.name + ".tmp")
    with partial_file(tmp, path):
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, user_file_mode())  # safetensors creates its files 0600
    os.replace(tmp, path)


def user_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` through
    ``torch.load(weights_only=True)``; a damaged file gets a one-line error."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError,
            pickle.UnpicklingError) as exc:
        raise ConfigError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") \
            from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a weights file, without reading the tensors
    where the format allows (safetensors: the header only); a damaged file gets a
    one-line error."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()
                if isinstance(v, torch.Tensor)}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") \
            from None
    return shapes


def load_state(model: nn.Module, path: Path) -> nn.Module:
    """Load tensors saved by :func:`save_state` strictly (tied tensors re-shared)."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    # keys stored once because tied: fill from the tensor they share storage with
    by_ptr = {own[k].data_ptr(): k for k in state if k in own}
    for k in missing[:]:
        twin = by_ptr.get(own[k].data_ptr())
        if twin is not None:
            state[k] = state[twin]
            missing.remove(k)
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        example = (missing or unexpected or bad_shape)[0]
        raise ConfigError(f"weights in {path} do not match the model "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, "
                          f"{len(bad_shape)} of wrong shape, e.g. {example})")
    model.load_state_dict(state, strict=True)
    return model
