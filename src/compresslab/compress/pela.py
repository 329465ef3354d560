"""PELA losses (docs/pela.md): feature distillation and weight-perturbation regularisation.

Pure torch, no Lightning. Each swappable rule is a small class with one call signature:

- feature selectors ``(student_blocks, teacher_blocks) -> list of (student, teacher) pairs``
  choose which features are distilled (``blocks``: every block output; ``final``:
  the last block's output only);
- WPR forms ``(residual) -> scalar`` measure how far one layer's factor product
  ``W_r W_l`` drifted from its frozen original ``W`` (``max_entry``: the reference
  infinity norm of the flattened residual; ``frobenius``: a smooth alternative).

PELA's compression ratio ``c`` (layer parameters divided by ``c``) maps to this
project's ``ratio`` (fraction removed) as ``ratio = 1 - 1/c``, i.e. ``c = 1/(1 - ratio)``;
given ``c``, the rank is computed from it exactly as the authors do (:func:`rank_from_c`),
since ``1 - 1/c`` in floating point can fall one rank short.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F

from compresslab.errors import ConfigError


def ratio_from_c(c: float) -> float:
    """The project's ratio (fraction removed) for PELA's ``c`` (parameters divided by c)."""
    if not c > 1:
        raise ConfigError(f"PELA's c must be larger than 1, got {c}")
    return 1.0 - 1.0 / c


def rank_from_c(in_features: int, out_features: int, c: float) -> int:
    """The authors' rank for compression ratio ``c``: ``(in*out) // (c*(in+out))``, in
    exact arithmetic (the float route ``floor(in*out*(1 - (1 - 1/c))/(in+out))`` gives 23
    instead of 24 for the 288 x 96 qkv of a 96-wide ViT at c = 3, 11 instead of 12 at 6)."""
    if not c > 1:
        raise ConfigError(f"PELA's c must be larger than 1, got {c}")
    return int(Fraction(in_features * out_features) / (Fraction(c) * (in_features + out_features)))


#: the authors' WPR settings: (weight, eps) of their DeiT scripts (WPR off) and Swin scripts
WPR_SETTINGS = {"deit": (0.0, 1e-3), "swin": (1.0, 0.0)}


# -- feature distillation ---------------------------------------------------------------------

class BlockFeatures:
    """Every block's output (all tokens): ``L_FD = mean_l MSE(H_l^s, H_l^t)``."""

    def __call__(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]):
        return list(zip(student, teacher, strict=True))


class FinalFeatures:
    """Only the last block's output (the paper's Swin variant distils one final feature)."""

    def __call__(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]):
        return [(student[-1], teacher[-1])]


FEATURE_SELECTORS = {"blocks": BlockFeatures, "final": FinalFeatures}


def feature_selector(name: str):
    if name not in FEATURE_SELECTORS:
        raise ConfigError(f"unknown PELA features {name!r} ({' | '.join(FEATURE_SELECTORS)})")
    return FEATURE_SELECTORS[name]()


def feature_distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                              selector=None) -> torch.Tensor:
    """Mean over the selected feature pairs of the plain element-mean MSE."""
    pairs = (selector or BlockFeatures())(student, teacher)
    return torch.stack([F.mse_loss(s.float(), t.detach().float()) for s, t in pairs]).mean()


# -- weight-perturbation regularisation -------------------------------------------------------

class MaxEntry:
    """Reference form: the largest absolute entry of the residual (its gradient reaches
    only that one entry)."""

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        return residual.abs().amax()


class Frobenius:
    """Smooth alternative: the residual's root-mean-square entry, comparable in scale to
    an entry (so the same ``eps`` makes sense) but with a gradient on every entry."""

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        return residual.pow(2).mean().sqrt()


WPR_FORMS = {"max_entry": MaxEntry, "frobenius": Frobenius}


def wpr_form(name: str):
    if name not in WPR_FORMS:
        raise ConfigError(f"unknown PELA wpr_form {name!r} ({' | '.join(WPR_FORMS)})")
    return WPR_FORMS[name]()


def weight_perturbation_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                             eps: float = 0.0, form=None) -> torch.Tensor:
    """``(1/P) sum_p (form(W_r^p W_l^p - W^p) - eps)^2`` over ``(factor product, original)``
    pairs; the originals are treated as constants."""
    form = form or MaxEntry()
    terms = [(form(product - original.detach()) - eps) ** 2 for product, original in pairs]
    return torch.stack(terms).mean()
