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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.filesystem import atomic_write_text
from compresslab.layers import apply_plan
from compresslab.weights_io import load_state, save_state, tensor_shapes

PLAN_FORMAT = "compresslab-plan/1"


def save_compressed(model: nn.Module, folder: Path, plan: dict[str, Any],
                    tokenizer: Any | None = None) -> Path:
    """The model's tensors, its plan and (when given) its tokenizer as transformers files,
    which ``python -m compresslab.export`` puts beside an exported model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state(model, folder / "model.safetensors")
    if tokenizer is not None:
        from compresslab.data.text import save_tokenizer

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
    its ``_target_`` must be a :class:`~compresslab.models.architecture.ModelSource` of this
    package, its options plain values, and ``trust_remote_code`` comes from the caller,
    never from the file."""
    from hydra.utils import get_object

    from compresslab.models.architecture import FAMILY_SOURCES, ModelSource

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
    from compresslab.data.spec import DataSpec

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
        guard_save(model)
    return model


def is_hf(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def guard_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` refuse (a transformers model with compressed layers):
    the stock method would write a config of the original shapes, and loading it would
    silently re-initialise every compressed weight at random."""
    if not is_hf(model):
        return

    def refuse(*args, **kwargs):
        raise ConfigError("save_pretrained cannot describe this model's compressed layers "
                          "(a reload would initialise them at random); use "
                          "compresslab.export.export_model(model, folder) or "
                          "python -m compresslab.export <run>/compressed <folder>")

    model.save_pretrained = refuse
