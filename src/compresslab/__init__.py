"""compresslab: compress pre-trained models and measure what the compression costs."""

from __future__ import annotations

__version__ = "0.1.0"


def load_compressed(path):
    """Rebuild a compressed model saved by a run (``<run>/compressed``)."""
    from compresslab.checkpoints import load_compressed as _load

    return _load(path)


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("tag"):
        # ${tag:r,0.4} -> "-r0.4"; ${tag:r,null} -> "" (optional parts of run names)
        OmegaConf.register_new_resolver(
            "tag", lambda prefix, value: "" if value is None else f"-{prefix}{value}")


register_resolvers()
