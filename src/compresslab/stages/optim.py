"""Optimiser and learning-rate schedule from a small config block."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compresslab.errors import ConfigError


@dataclass
class OptimConfig:
    """``name``: adamw | sgd (sgd with momentum 0 is plain gradient descent).
    ``schedule``: cosine (linear warmup then cosine to ``min_lr_ratio * lr``) | constant."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.name!r} (adamw | sgd)")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r} (cosine | constant)")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")

    @classmethod
    def from_cfg(cls, cfg) -> OptimConfig:
        data = dict(cfg or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown optimizer option(s): {', '.join(sorted(unknown))}")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_optimizer(params, cfg: OptimConfig, total_steps: int):
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=cfg.betas)
    elif cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        raise AssertionError(cfg.name)  # rejected by OptimConfig already
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
