"""Safe on-disk formats: safetensors weights plus a JSON compression plan.

A compressed model is saved as a folder::

    model.safetensors   the compressed model's tensors
    plan.json           how to rebuild it: the model and dataset configs that
                        build the base architecture, and one entry per
                        transformed module (e.g. {"kind": "lowrank", "rank": 38})

:func:`load_compressed` rebuilds the base architecture, re-applies the plan
(structure only) and loads the tensors strictly. Nothing is ever unpickled
except through ``torch.load(weights_only=True)`` for foreign ``.pt`` files.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compresslab.errors import ConfigError
from compresslab.filesystem import partial_file

PLAN_FORMAT = "compresslab-plan/1"

#: kind -> function(existing module, entry) -> replacement module (structure only)
PLAN_APPLIERS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {}


#: kind -> function(model, module name, entry), run once every entry is applied: restores
#: what the new shapes imply outside the module itself (e.g. an attention's head count)
PLAN_FINISHERS: dict[str, Callable[[nn.Module, str, dict[str, Any]], None]] = {}


def plan_applier(kind: str):
    def wrap(fn):
        PLAN_APPLIERS[kind] = fn
        return fn
    return wrap


def plan_finisher(kind: str):
    def wrap(fn):
        PLAN_FINISHERS[kind] = fn
        return fn
    return wrap


@plan_applier("lowrank")
def _apply_lowrank(module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    from compresslab.compress.lowrank import LowRankLinear

    return LowRankLinear(entry["in_features"], entry["out_features"], entry["rank"],
                         bias=entry["bias"], dtype=module.weight.dtype)


@plan_applier("resized_linear")
def _apply_resized_linear(module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """A linear of new shape (e.g. a width-reduced deep linear network's layer)."""
    return nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"],
                     dtype=module.weight.dtype)


def apply_plan(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    from compresslab.models.utils import set_module

    for name, entry in layers.items():
        kind = entry.get("kind")
        if kind not in PLAN_APPLIERS:
            raise ConfigError(f"plan entry {name} has unknown kind {kind!r}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"plan names module {name}, which the model does not have") \
                from None
        try:
            replacement = PLAN_APPLIERS[kind](module, entry)
        except KeyError as exc:
            raise ConfigError(f"plan entry {name} (kind {kind!r}) lacks {exc}") from None
        except (TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"plan entry {name} (kind {kind!r}) cannot be applied: "
                              f"{reason}") from None
        set_module(model, name, replacement)
    for name, entry in layers.items():
        finish = PLAN_FINISHERS.get(entry["kind"])
        if finish is not None:
            try:
                finish(model, name, entry)
            except KeyError as exc:
                raise ConfigError(f"plan entry {name} (kind {entry['kind']!r}) lacks "
                                  f"{exc}") from None
    return model


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with partial_file(tmp, path):
        tmp.write_text(text)
    os.replace(tmp, path)


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


def save_compressed(model: nn.Module, folder: Path, plan: dict[str, Any],
                    tokenizer: Any | None = None) -> Path:
    """The model's tensors, its plan and (when given) its tokenizer as transformers files,
    which ``python -m compresslab.export`` puts beside an exported model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state(model, folder / "model.safetensors")
    if tokenizer is not None:
        from compresslab.export import save_tokenizer

        save_tokenizer(tokenizer, folder)
    atomic_write_text(folder / "plan.json", json.dumps({"format": PLAN_FORMAT, **plan},
                                                       indent=1, sort_keys=True))
    return folder


def read_plan(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "plan.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no plan.json; is it a compressed-model folder?")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"plan {path} is not valid JSON (truncated or damaged?): {exc}") \
            from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        found = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise ConfigError(f"plan {path} has format {found!r}, expected {PLAN_FORMAT!r}")
    for key, kind in (("model", dict), ("data_spec", dict), ("layers", dict)):
        if not isinstance(plan.get(key), kind):
            raise ConfigError(f"plan {path} lacks {key!r} (or it is not a JSON object)")
    if not isinstance(plan["model"].get("source"), dict):
        raise ConfigError(f"plan {path} lacks the model's 'source'")
    bad = [n for n, e in plan["layers"].items() if not isinstance(e, dict)]
    if bad:
        raise ConfigError(f"plan {path}: layer entry {bad[0]} is not a JSON object")
    return plan


def safe_source(source_cfg: dict[str, Any], where: str, trust_remote_code: bool = False):
    """The model source a plan names, built without running anything the plan chooses:
    its ``_target_`` must be a :class:`~compresslab.models.sources.ModelSource` of this
    package, its options plain values, and ``trust_remote_code`` comes from the caller,
    never from the file."""
    from hydra.utils import get_object

    from compresslab.models.sources import FAMILY_SOURCES, ModelSource

    options = dict(source_cfg)
    target = options.pop("_target_", None)
    if not isinstance(target, str) or not target.startswith("compresslab."):
        raise ConfigError(f"{where}: model source {target!r} is not a compresslab model source")
    try:
        cls = get_object(target)
    except Exception:  # noqa: BLE001  (hydra raises several kinds for a bad path)
        raise ConfigError(f"{where}: unknown model source {target!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, ModelSource) or cls in FAMILY_SOURCES):
        raise ConfigError(f"{where}: {target!r} is not a compresslab model source")

    def nested_target(value) -> bool:
        if isinstance(value, dict):
            return "_target_" in value or any(nested_target(v) for v in value.values())
        if isinstance(value, list):
            return any(nested_target(v) for v in value)
        return False

    if any(nested_target(v) for v in options.values()):
        raise ConfigError(f"{where}: model source options may not name objects (_target_)")
    if "trust_remote_code" in options:
        options["trust_remote_code"] = bool(trust_remote_code)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"{where}: bad model source options: {exc}") from None


#: fields of a plan that hold counts: positive integers
PLAN_COUNTS = ("vocab_size", "num_classes", "image_size", "channels", "rank", "in_features",
               "out_features", "heads", "kv_heads", "terms")


def check_plan_types(spec: dict[str, Any], layers: dict[str, dict], where: str) -> None:
    """Counts are positive integers and switches booleans, or a one-line ConfigError (not a
    type comparison deep inside a model constructor)."""
    def bad(value, kind) -> bool:
        if kind == "count":
            return isinstance(value, bool) or not isinstance(value, int) or value < 1
        return not isinstance(value, bool)

    fields = [("data_spec", k, v) for k, v in spec.items()]
    fields += [(f"layer {n}", k, v) for n, e in layers.items() for k, v in e.items()]
    for place, key, value in fields:
        kind = "count" if key in PLAN_COUNTS else "switch" if key == "bias" else None
        if kind and value is not None and bad(value, kind):
            wanted = "a positive integer" if kind == "count" else "true or false"
            raise ConfigError(f"{where}: {place}: {key} must be {wanted}, got {value!r}")
    shape = spec.get("matrix_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 2
                              or any(bad(v, "count") for v in shape)):
        raise ConfigError(f"{where}: data_spec: matrix_shape must be two positive integers, "
                          f"got {shape!r}")


def check_plan_shapes(source, spec, layers: dict[str, dict], weights: Path, where: str) -> None:
    """The model the plan describes, built without memory (meta device), against the
    weights file's header: a plan that does not fit its weights (e.g. a huge vocabulary)
    is refused before the real model is allocated."""
    try:
        with torch.device("meta"):
            model = apply_plan(source.skeleton(spec), layers)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot build the model it describes: "
                          f"{str(exc).splitlines()[0]}") from None
    stored = tensor_shapes(weights)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unexpected = [k for k in stored if k not in expected]
    wrong = [k for k in stored if k in expected and stored[k] != expected[k]]
    if unexpected or wrong:
        name = (wrong or unexpected)[0]
        got = f"{stored[name]} in the file, {expected[name]} by the plan" if wrong \
            else "not in the model the plan describes"
        raise ConfigError(f"weights in {weights} do not match the model {where} describes "
                          f"({len(unexpected)} unexpected, {len(wrong)} of wrong shape, "
                          f"e.g. {name}: {got})")


def load_compressed(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved with :func:`save_compressed` (architecture from the
    plan's configs, structure from its layer entries, tensors from safetensors).

    Nothing in the folder can run code: the plan may only name a model source of this
    package, and a checkpoint's own modelling code (HF ``trust_remote_code``) runs only
    if the caller passes ``trust_remote_code=True``, whatever the plan says."""
    from compresslab.compress import soka  # noqa: F401  (registers "kronecker_adapter")
    from compresslab.models.sources import DataSpec
    from compresslab.stages import prune  # noqa: F401  (registers the "pruned_linear" kind)

    folder = Path(folder)
    plan = read_plan(folder)
    where = f"plan {folder / 'plan.json'}"
    source = safe_source(plan["model"]["source"], where, trust_remote_code)
    spec = dict(plan["data_spec"])
    check_plan_types(spec, plan["layers"], where)
    if spec.get("matrix_shape"):
        spec["matrix_shape"] = tuple(spec["matrix_shape"])
    try:
        spec = DataSpec(**spec)
    except TypeError as exc:
        raise ConfigError(f"{where}: bad data_spec: {exc}") from None
    check_plan_shapes(source, spec, plan["layers"], folder / "model.safetensors", where)
    try:
        model = source.build(spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot build the model it describes: "
                          f"{str(exc).splitlines()[0]}") from None
    apply_plan(model, plan["layers"])
    model = load_state(model, folder / "model.safetensors").eval()
    if plan["layers"]:
        from compresslab.export import guard_save

        guard_save(model)
    return model
