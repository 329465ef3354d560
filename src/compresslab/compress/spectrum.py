"""Learned singular-spectrum selection (docs/spectrum.md), the pure-torch part.

A shortlisted low-rank layer ``W = B A`` (``A`` = first, ``B`` = second, components
ordered by (whitened) singular value, ``s`` folded into the factors) becomes
``W(m) = B diag(g(m)) A`` with one learnable gate per component. The training stage
(``stages/spectrum.py``) learns ``m``; this module holds the swappable rules:

- gates (``GATES``): ``sigmoid`` (g = sigmoid(m), in (0, 1)), ``clamp`` (g = clamp(m, 0,
  1)), ``free`` (g = m, unbounded: the fine-tuning phase, where kept components may
  be amplified above their original size);
- budget penalties (``PENALTIES``) on the expected kept parameters
  ``E = sum_layers (in + out) * sum_i g_i`` against the budget ``B``;
- selection scores (``SCORES``) for the global, parameter-weighted choice of components;
- amplification rules (``AMPLIFY``): the scale a kept component starts fine-tuning with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.layers.lowrank import LowRankLinear


class Gate:
    """``value(m)`` maps logits to gates; ``logits_for(g)`` inverts it for initialisation."""

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_for(self, gates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SigmoidGate(Gate):
    def value(self, logits):
        return torch.sigmoid(logits)

    def logits_for(self, gates):
        g = gates.clamp(1e-6, 1 - 1e-6)
        return torch.log(g) - torch.log1p(-g)


class ClampGate(Gate):
    def value(self, logits):
        return logits.clamp(0.0, 1.0)

    def logits_for(self, gates):
        return gates.clone()


class FreeGate(Gate):
    def value(self, logits):
        return logits

    def logits_for(self, gates):
        return gates.clone()


GATES: dict[str, type[Gate]] = {"sigmoid": SigmoidGate, "clamp": ClampGate, "free": FreeGate}


def make_gate(name: str) -> Gate:
    if name not in GATES:
        raise ConfigError(f"unknown gate {name!r} ({' | '.join(GATES)})")
    return GATES[name]()


class GatedLowRankLinear(nn.Module):
    """``y = B (g * (A x)) + b``: a :class:`LowRankLinear` with one gate per component."""

    def __init__(self, low: LowRankLinear, gate: str = "sigmoid", init_gate: float = 0.9):
        super().__init__()
        self.first, self.second = low.first, low.second
        self.in_features, self.out_features = low.in_features, low.out_features
        self.gate = make_gate(gate)
        init = torch.full((low.rank,), float(init_gate), dtype=low.first.weight.dtype)
        self.logits = nn.Parameter(self.gate.logits_for(init))
        #: optional 0/1 keep-mask applied in the forward pass with straight-through
        #: gradients: dropped components still learn whether they should come back
        self.mask: torch.Tensor | None = None

    @property
    def cost(self) -> int:
        """Parameters one component costs."""
        return self.in_features + self.out_features

    def gates(self) -> torch.Tensor:
        return self.gate.value(self.logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates()
        if self.mask is not None:
            g = g + (g * self.mask - g).detach()
        return self.second(self.first(x) * g)

    @torch.no_grad()
    def keep(self, mask: torch.Tensor, scales: torch.Tensor) -> None:
        """Drop the components outside ``mask``; the kept ones get free gates ``scales``."""
        index = mask.nonzero().flatten()
        self.first.weight = nn.Parameter(self.first.weight[index].clone())
        self.second.weight = nn.Parameter(self.second.weight[:, index].clone())
        self.gate = FreeGate()
        self.logits = nn.Parameter(scales[index].to(self.logits.dtype).clone())

    @torch.no_grad()
    def fold(self) -> LowRankLinear:
        """The equivalent :class:`LowRankLinear` (gates folded evenly into both factors)."""
        g = self.gates()
        root = g.abs().sqrt()
        return LowRankLinear.from_factors(self.second.weight * (root * g.sign()),
                                          root[:, None] * self.first.weight, self.second.bias)


# -- budget ------------------------------------------------------------------------------

def expected_params(layers: dict[str, GatedLowRankLinear]) -> torch.Tensor:
    """``sum_layers (in + out) * sum_i g_i`` (differentiable)."""
    return sum(layer.cost * layer.gates().sum() for layer in layers.values())


PENALTIES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    # only parameters above the budget cost anything
    "hinge": lambda expected, budget: torch.relu(expected - budget) / budget,
    # pulled to the budget from both sides
    "two_sided": lambda expected, budget: (expected - budget).abs() / budget,
}


def penalty_rule(name: str):
    if name not in PENALTIES:
        raise ConfigError(f"unknown budget penalty {name!r} ({' | '.join(PENALTIES)})")
    return PENALTIES[name]


# -- global selection ----------------------------------------------------------------------

SCORES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "gate": lambda gates, cost: gates,
    "gate_per_param": lambda gates, cost: gates / cost,
}


def score_rule(name: str):
    if name not in SCORES:
        raise ConfigError(f"unknown selection score {name!r} ({' | '.join(SCORES)})")
    return SCORES[name]


def select_components(gates: dict[str, torch.Tensor], costs: dict[str, int], budget: float,
                      score: str = "gate") -> dict[str, torch.Tensor]:
    """Boolean keep-mask per matrix: the best-scoring components of all matrices,
    greedily while they fit in ``budget`` parameters (every matrix keeps at least its
    best component; ties go to the larger singular value, i.e. the lower index).

    The kept total never exceeds the budget unless the one-per-matrix minimum does, and
    the unused budget is smaller than the cost of any component left out."""
    rule = score_rule(score)
    masks = {name: torch.zeros(len(g), dtype=torch.bool) for name, g in gates.items()}
    items = []
    for name, g in gates.items():
        scores = rule(g.detach().double(), costs[name])
        for i, value in enumerate(scores.tolist()):
            items.append((-value, i, name))
    items.sort()
    used = 0.0
    for _, i, name in items:  # the best component of every matrix first
        if not masks[name].any():
            masks[name][i] = True
            used += costs[name]
    for _, i, name in items:
        if not masks[name][i] and used + costs[name] <= budget:
            masks[name][i] = True
            used += costs[name]
    return masks


def kept_params(masks: dict[str, torch.Tensor], costs: dict[str, int]) -> int:
    return sum(int(m.sum()) * costs[name] for name, m in masks.items())


# -- amplification -------------------------------------------------------------------------

AMPLIFY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fold": lambda gates: gates.clone(),             # kept components keep their learned gate
    "restore": lambda gates: torch.ones_like(gates),  # back to the original singular values
}


def amplify_rule(name: str):
    if name not in AMPLIFY:
        raise ConfigError(f"unknown amplify rule {name!r} ({' | '.join(AMPLIFY)})")
    return AMPLIFY[name]


# -- reporting -------------------------------------------------------------------------------

def rank_heatmap(grid: dict[tuple[int, str], int], full: dict[tuple[int, str], int],
                 path, title: str = "rank per layer and matrix"):
    """PNG heat map: rows = blocks, columns = matrix roles, colour = rank / full rank,
    each cell annotated with its rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.report import save_figure

    blocks = sorted({b for b, _ in grid})
    roles = list(dict.fromkeys(r for _, r in grid))
    frac = torch.full((len(blocks), len(roles)), math.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(roles), 1.0 + 0.45 * len(blocks)))
    for (b, r), rank in grid.items():
        y, x = blocks.index(b), roles.index(r)
        frac[y, x] = rank / full[(b, r)]
        ax.text(x, y, str(rank), ha="center", va="center", fontsize=8)
    image = ax.imshow(frac.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="rank / full rank")
    return save_figure(fig, path, dpi=120)
