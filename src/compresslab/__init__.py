"""compresslab: compress pre-trained models and measure what the compression costs."""

from __future__ import annotations

__version__ = "0.1.0"


def load_compressed(path, trust_remote_code: bool = False):
    """Rebuild a compressed model saved by a run (``<run>/compressed``): safetensors and a
    JSON plan only; a checkpoint's own modelling code runs only with
    ``trust_remote_code=True``."""
    from compresslab.checkpoints import load_compressed as _load

    return _load(path, trust_remote_code=trust_remote_code)


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("tag"):
        # ${tag:r,0.4} -> "-r0.4"; ${tag:r,null} -> "" (optional parts of run names)
        OmegaConf.register_new_resolver(
            "tag", lambda prefix, value: "" if value is None else f"-{prefix}{value}")
    if not OmegaConf.has_resolver("if_local"):
        # ${if_local:${model.path},0,900}: the first value with a local checkpoint/weights
        # file set, the second for the embedded model trained here
        OmegaConf.register_new_resolver(
            "if_local", lambda path, local, embedded: local if path else embedded)
    if not OmegaConf.has_resolver("slurm_per_node"):
        # ${slurm_per_node:${trainer.devices}}: GPUs (= tasks) per node for hydra/launcher=slurm
        OmegaConf.register_new_resolver("slurm_per_node", _slurm_per_node)


def _slurm_per_node(devices) -> int:
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    raise ValueError(f"hydra/launcher=slurm needs trainer.devices set to the number of GPUs "
                     f"per node (got {devices!r})")


register_resolvers()
