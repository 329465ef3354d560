"""Which dataset and base model a run uses, and why: printed as the run's header and
written to ``run_info.json``, so that a default the user did not choose is never a
silent surprise."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from compresslab.matrix import CONFIGS


def command_line_overrides() -> list[str] | None:
    """The overrides typed on the command line (None outside a ``run.py`` job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed with compose(): no Hydra job
        return None


def _experiment_sets_dataset(experiment: str | None) -> bool:
    if not experiment:
        return False
    path = CONFIGS / "experiment" / f"{experiment}.yaml"
    node = OmegaConf.load(path) if path.is_file() else {}
    return any("override /dataset" in str(entry) for entry in node.get("defaults") or [])


def dataset_reason(cfg: DictConfig, overrides: list[str] | None) -> str:
    experiment = _chosen_experiment(overrides)
    if overrides is not None and any(o.split("=", 1)[0].lstrip("+~") == "dataset"
                                     for o in overrides):
        return "given on the command line"
    if _experiment_sets_dataset(experiment):
        return f"set by experiment={experiment}"
    if overrides is None:
        return "composed config (the model's default unless set)"
    return f"the default dataset of model={cfg.model.name}"


def _chosen_experiment(overrides: list[str] | None) -> str | None:
    for entry in overrides or []:
        key, _, value = entry.partition("=")
        if key.lstrip("+") == "experiment":
            return value
    return None


def base_model_reason(cfg: DictConfig) -> str:
    """Where the base model comes from."""
    local = cfg.model.get("path") or cfg.model.get("weights")
    if local:
        return f"local checkpoint {local}"
    pre = cfg.model.get("pretrain")
    steps = int(pre.get("max_steps", 0) or 0) if pre else 0
    if steps:
        return (f"embedded model, no checkpoint given: pre-trained here for {steps} steps "
                f"(seed {pre.get('seed', 0)}) and cached under {cfg.paths.base}")
    return "built here untrained (the method trains it)"


def describe(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """The choices as a record for ``run_info.json``."""
    overrides = command_line_overrides() if overrides is None else overrides
    return {"model": cfg.model.name, "family": cfg.model.get("family"),
            "base_model": base_model_reason(cfg),
            "dataset": cfg.dataset.name, "dataset_reason": dataset_reason(cfg, overrides),
            "method": cfg.method.name}


def header(choices: dict[str, Any], run_dir) -> str:
    """The run's first lines on the console."""
    return (f"compresslab: method={choices['method']} model={choices['model']} "
            f"dataset={choices['dataset']} -> {run_dir}\n"
            f"  dataset: {choices['dataset']} ({choices['dataset_reason']})\n"
            f"  base model: {choices['base_model']}")
