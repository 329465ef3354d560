"""Structured pruning of attention heads and MLP channels (docs/numerical_pruning.md).

Pure torch, no Lightning. Convention of the paper: a linear computes ``Y = X W``
with ``X`` (tokens x D inputs) and ``W`` (D x D'), so ``W = linear.weight.T``.

* a **structure** is one attention group (a key/value head with the query heads
  that share it; with plain multi-head attention that is one head) or one MLP
  intermediate channel; it is scored from the inputs of the layer that consumes
  it (o_proj / down_proj);
* **criteria** (:class:`NumericalScore`, :class:`MagnitudeScore`,
  :class:`WandaScore`, :class:`FluctuationScore`) share one call signature
  ``criterion(weight, inputs, group_size) -> structure scores`` (higher = keep);
* **allocators** (:class:`GlobalAllocation`, :class:`UniformAllocation`) turn the
  scores of every layer into the set of structures to remove;
* **compensators** (:class:`OBSCompensation`, :class:`BiasCompensation`) update
  the consuming layer before its pruned input rows are deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compresslab.compress.calibration import ChannelMoments, Gram
from compresslab.compress.linalg import RepairLog, cholesky_with_repair, spd_inverse, spd_solve
from compresslab.errors import NumericalError


class LayerInputs(ChannelMoments):
    """Per-channel moments plus the Gram matrix ``X^T X`` (float64) of one layer's inputs;
    ``moments=False`` / ``gram=False`` skip a part nobody reads (each costs about one
    float64 pass over the inputs)."""

    def __init__(self, moments: bool = True, gram: bool = True):
        super().__init__()
        self.moments = moments
        self._gram = Gram(torch.float64) if gram else None

    def update(self, x):
        if self.moments:
            super().update(x)
        if self._gram is not None:
            self._gram.update(x)

    @property
    def gram(self) -> torch.Tensor:
        if self._gram is None:
            raise RuntimeError("LayerInputs collected without the Gram matrix")
        return self._gram.gram


def layer_inputs_for(*users) -> Callable[[], LayerInputs]:
    """A factory of :class:`LayerInputs` with the parts that ``users`` (criteria,
    compensators; None ignored) read: their ``needs_moments`` / ``needs_gram``."""
    users = [u for u in users if u is not None]
    moments = any(getattr(u, "needs_moments", True) for u in users)
    gram = any(getattr(u, "needs_gram", True) for u in users)
    return lambda: LayerInputs(moments, gram)


def group_reduce(channel_scores: torch.Tensor, group_size: int, how: str) -> torch.Tensor:
    """Per-structure score from per-input-channel scores (consecutive groups)."""
    grouped = channel_scores.reshape(-1, group_size)
    return grouped.mean(1) if how == "mean" else grouped.sum(1)


# -- numerical score (Newton's method on the soft mask) -------------------------------------

def mask_hessian(weight: torch.Tensor, gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``Hl = (W W^T) o (X^T X)``, scaled to unit mean diagonal, plus ``damping * I``.

    The scaling makes ``lambda`` and ``damping`` independent of the activation scale."""
    w = weight.double().T                       # D x D'
    hl = (w @ w.T) * gram.double()
    hl = hl / hl.diagonal().mean().clamp_min(1e-30)
    hl.diagonal().add_(damping)                 # in place: no n x n identity and copy
    return hl


#: above this many channels the conditioning is not measured (an eigendecomposition of a
#: large Hessian would cost more than the pruning itself)
CONDITIONING_MAX_DIM = 4096


def conditioning(matrix: torch.Tensor) -> dict[str, float] | None:
    """Smallest eigenvalue and condition number of a symmetric matrix (after its damping):
    how well posed the solve with it is. None above :data:`CONDITIONING_MAX_DIM`."""
    if len(matrix) > CONDITIONING_MAX_DIM:
        return None
    eig = torch.linalg.eigvalsh(matrix.double())
    smallest, largest = float(eig[0]), float(eig[-1])
    return {"min_eig": smallest,
            "cond": largest / smallest if smallest > 0 else float("inf")}


def numerical_mask(hl: torch.Tensor, keep: float, lam: float,
                   repairs: RepairLog | None = None) -> torch.Tensor:
    """Closed-form minimiser ``z* = 1 - c Hl^{-1} 1`` of the quadratic mask objective
    ``1/2 (1-z)^T Hl (1-z) + lam/2 (<1,z> - keep)^2``. A singular ``Hl`` (no damping,
    dead channels) is repaired by :func:`~compresslab.compress.linalg.cholesky_with_repair`."""
    d = len(hl)
    hinv_one = spd_solve(hl, torch.ones(d, dtype=hl.dtype), what="the mask Hessian",
                         repairs=repairs)
    c = lam * (d - keep) / (1 + lam * hinv_one.sum())
    return 1 - c * hinv_one


def numerical_mask_newton(hl: torch.Tensor, keep: float, lam: float, steps: int = 50,
                          start: torch.Tensor | None = None,
                          repairs: RepairLog | None = None) -> torch.Tensor:
    """The same minimiser by the paper's iterated Newton steps ``z <- z - H^{-1} g``."""
    d = len(hl)
    one = torch.ones(d, dtype=hl.dtype)
    hess = hl + lam * torch.outer(one, one)
    chol, shift = cholesky_with_repair(hess, what="the mask Newton Hessian")
    if repairs is not None:
        repairs.record("the mask Newton Hessian", shift)
    z = one.clone() if start is None else start.to(hl.dtype).clone()
    for _ in range(steps):
        grad = hl @ (z - 1) + lam * (z.sum() - keep) * one
        z = z - torch.cholesky_solve(grad[:, None], chol)[:, 0]
    return z


# -- importance criteria: criterion(weight, inputs, group_size) -> scores (higher = keep) ----

class Criterion:
    """Scores the input structures of a consuming linear (``weight``: out x in)."""

    #: which parts of :class:`LayerInputs` the criterion reads
    needs_moments: bool = True
    needs_gram: bool = True

    def __call__(self, weight: torch.Tensor, inputs: LayerInputs,
                 group_size: int) -> torch.Tensor:
        raise NotImplementedError

    def report(self) -> dict[str, float]:
        """Numbers for the stage's metrics (e.g. repairs of singular solves)."""
        return {}


class NumericalScore(Criterion):
    """Soft-mask score of the numerical pruning paper: ``z*`` per input channel, the mean
    over a structure's channels. ``ratio`` sets the mask budget ``r = (1 - ratio) D``;
    ``newton_steps > 0`` iterates Newton instead of the closed form (same result)."""

    needs_moments = False

    def __init__(self, ratio: float, lam: float = 1.0, damping: float = 1e-4,
                 newton_steps: int = 0):
        self.ratio, self.lam, self.damping, self.newton_steps = ratio, lam, damping, newton_steps
        self.repairs = RepairLog("score_cholesky")
        self.last_conditioning: dict[str, float] | None = None   # of the last mask solve

    def __call__(self, weight, inputs, group_size):
        hl = mask_hessian(weight, inputs.gram, self.damping)
        self.last_conditioning = conditioning(hl)
        keep = (1 - self.ratio) * len(hl)
        z = (numerical_mask_newton(hl, keep, self.lam, self.newton_steps, repairs=self.repairs)
             if self.newton_steps else numerical_mask(hl, keep, self.lam, self.repairs))
        return group_reduce(z, group_size, "mean")

    def report(self):
        return self.repairs.report()


class MagnitudeScore(Criterion):
    """Magnitude-sp as the FLAP authors' code scores it: the L2 norm of each input column
    of the consuming layer, summed over a structure's columns (not their joint norm)."""

    needs_moments = needs_gram = False

    def __call__(self, weight, inputs, group_size):
        return group_reduce(weight.double().pow(2).sum(0).sqrt(), group_size, "sum")


class WandaScore(Criterion):
    """Wanda-sp: ``mean_i |W_ij| * ||X_j||_2`` per channel, summed over a structure."""

    needs_gram = False

    def __call__(self, weight, inputs, group_size):
        channel = weight.double().abs().mean(0) * inputs.l2_norm
        return group_reduce(channel, group_size, "sum")


class FluctuationScore(Criterion):
    """FLAP in the authors' order: the channel fluctuation ``Var(X_j) * ||W_:,j||^2``
    (squared for attention channels, as their code does), standardised over the layer's
    channels, *then* averaged per head. Standardising per channel keeps heads on the
    scale of MLP channels in the global allocation (standardising a few head means
    instead spreads them over several standard deviations, and heads lose far more).
    Attention layers are told apart by ``group_size > 1`` (an MLP channel is one input);
    ``square_heads: false`` drops the square."""

    needs_gram = False

    def __init__(self, square_heads: bool = True):
        self.square_heads = square_heads

    def __call__(self, weight, inputs, group_size):
        channel = inputs.variance * weight.double().pow(2).sum(0)
        if group_size > 1 and self.square_heads:
            channel = channel.pow(2)
        return group_reduce(standardized(channel), group_size, "mean")


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` (unbiased std, as FLAP's code; all zeros for constant ``s``)."""
    std = scores.std() if len(scores) > 1 else scores.new_tensor(0.0)
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


# -- allocation across layers ---------------------------------------------------------------

@dataclass
class LayerScores:
    """The structures of one kind ("attention" or "mlp") in one block."""

    block: int
    kind: str
    scores: torch.Tensor          # one per structure
    params_each: int              # parameters a structure carries


class Allocator:
    """``allocator(layers, ratio) -> {(block, kind): indices to remove}``."""

    def __call__(self, layers: Sequence[LayerScores], ratio: float
                 ) -> dict[tuple[int, str], list[int]]:
        raise NotImplementedError


class GlobalAllocation(Allocator):
    """Remove the lowest-scoring structures of all layers together until the removed
    parameters reach ``ratio`` of the prunable ones. A structure that would overshoot
    the target is skipped (a smaller one may still fit), so the achieved reduction is
    below the target by less than the smallest structure. Every layer keeps at least
    ``min_keep`` structures (a layer with none left cannot run)."""

    def __init__(self, min_keep: int = 1):
        self.min_keep = min_keep

    def __call__(self, layers, ratio):
        target = ratio * sum(len(ls.scores) * ls.params_each for ls in layers)
        ranked = sorted(((float(s), i, j) for i, ls in enumerate(layers)
                         for j, s in enumerate(ls.scores)), key=lambda t: (t[0], t[1], t[2]))
        removed = {(ls.block, ls.kind): [] for ls in layers}
        smallest = min(ls.params_each for ls in layers)
        done = 0
        for _score, i, j in ranked:
            if target - done < smallest:
                break
            ls = layers[i]
            chosen = removed[(ls.block, ls.kind)]
            if done + ls.params_each > target or len(ls.scores) - len(chosen) <= self.min_keep:
                continue
            chosen.append(j)
            done += ls.params_each
        return {k: sorted(v) for k, v in removed.items()}


class UniformAllocation(Allocator):
    """The same ratio in every block: ``round(ratio * heads)`` attention groups, then
    MLP channels up to ``ratio`` of the block's prunable parameters."""

    def __call__(self, layers, ratio):
        by_block: dict[int, dict[str, LayerScores]] = {}
        for ls in layers:
            by_block.setdefault(ls.block, {})[ls.kind] = ls
        removed = {}
        for block, kinds in by_block.items():
            budget = ratio * sum(len(ls.scores) * ls.params_each for ls in kinds.values())
            for kind in sorted(kinds):          # "attention" before "mlp"
                ls = kinds[kind]
                n = len(ls.scores)
                count = round(ratio * n) if kind != "mlp" else round(budget / ls.params_each)
                count = max(0, min(count, n - 1))
                budget -= count * ls.params_each
                removed[(block, kind)] = sorted(torch.argsort(ls.scores)[:count].tolist())
        return removed


#: ``method.allocation`` -> allocator: per_layer removes the same fraction in every block,
#: global ranks every structure of every layer together (the paper's allocation)
ALLOCATIONS = {"per_layer": UniformAllocation, "global": GlobalAllocation}


def allocation(name: str) -> Allocator:
    """The allocator ``method.allocation`` names (a bad name: one-line ConfigError)."""
    from compresslab.errors import ConfigError

    if name not in ALLOCATIONS:
        raise ConfigError(f"method.allocation must be {' | '.join(ALLOCATIONS)}, got {name!r}")
    return ALLOCATIONS[name]()


def align_kept(layers: Sequence[LayerScores], removal: dict[tuple[int, str], list[int]],
               align: int, kinds: Sequence[str] = ("mlp",)) -> dict[tuple[int, str], list[int]]:
    """Adjust ``removal`` so that every layer of ``kinds`` keeps a multiple of ``align``
    structures: the nearest multiple (ties: keep more; at least ``align`` when the layer
    has that many), by restoring its best-scored removed structures or removing its
    worst-scored kept ones. Matrix products with such widths run faster (an MLP of 2239
    channels costs ~20% more per channel than one of 2240 on a CPU; docs/bench.md); the
    achieved ratio moves by less than ``align / 2`` structures per layer."""
    if align <= 1:
        return removal
    out = dict(removal)
    for ls in layers:
        key = (ls.block, ls.kind)
        if ls.kind not in kinds:
            continue
        n, gone = len(ls.scores), list(out.get(key, []))
        kept = n - len(gone)
        target = min(n, max(align if n >= align else kept,
                            align * ((kept + align // 2) // align)))
        if target == kept:
            continue
        order = sorted(range(n), key=lambda j: float(ls.scores[j]))      # worst first
        if target > kept:                       # restore the best-scored removed ones
            restore = set(sorted(gone, key=lambda j: float(ls.scores[j]))[kept - target:])
            out[key] = sorted(j for j in gone if j not in restore)
        else:                                   # remove the worst-scored kept ones
            extra = [j for j in order if j not in set(gone)][:kept - target]
            out[key] = sorted(gone + extra)
    return out


# -- compensation of the consuming layer ----------------------------------------------------

class Compensator:
    """``compensator(linear, inputs, pruned)`` updates ``linear`` in place before the
    input channels ``pruned`` are deleted from it."""

    needs_moments: bool = True
    needs_gram: bool = True

    def __call__(self, linear: nn.Linear, inputs: LayerInputs, pruned: torch.Tensor) -> None:
        raise NotImplementedError

    def report(self) -> dict[str, float]:
        """Numbers for the stage's metrics (e.g. repairs of singular solves)."""
        return {}


def obs_matrix(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``G = 2 X^T X + gamma I`` with ``gamma = damping * mean diag(2 X^T X)`` (float64; a new
    matrix, ``gram`` unchanged)."""
    g = 2 * gram.double()
    g.diagonal().add_(damping * g.diagonal().mean().clamp_min(1e-30))  # no n x n identity
    return g


def obs_update(weight: torch.Tensor, gram: torch.Tensor, pruned: torch.Tensor,
               damping: float, repairs: RepairLog | None = None,
               g: torch.Tensor | None = None) -> torch.Tensor:
    """Group-OBS row removal: ``W + dW*`` with ``dW* = -G^{-1} M (M^T G^{-1} M)^{-1} M^T W``,
    ``G = 2 X^T X + gamma I``, ``gamma = damping * mean diag(2 X^T X)``.

    ``weight``: out x in (an ``nn.Linear`` weight); returns the updated weight, whose
    pruned input columns are zero. A singular ``G`` (``damping`` 0 with fewer tokens than
    inputs, dead channels) is repaired by
    :func:`~compresslab.compress.linalg.cholesky_with_repair` and counted in ``repairs``.
    ``g``: :func:`obs_matrix` of ``gram`` when the caller has it already."""
    g = obs_matrix(gram, damping) if g is None else g
    w = weight.double().T                                    # D x D'
    ginv = spd_inverse(g, what="2 X^T X + gamma I", repairs=repairs)
    cols = ginv[:, pruned]                                   # G^{-1} M
    delta = -cols @ spd_solve(cols[pruned], w[pruned], what="the pruned block of G^-1",
                              repairs=repairs)
    updated = w + delta
    if not bool(torch.isfinite(updated).all()):
        raise NumericalError("group-OBS update is not finite (NaN/Inf weights)")
    updated[pruned] = 0                                      # exact zeros (round-off)
    return updated.T.to(weight.dtype)


class OBSCompensation(Compensator):
    """Group-OBS update of the remaining input rows (``damping``: relative gamma)."""

    needs_moments = False

    def __init__(self, damping: float = 0.01):
        self.damping = damping
        self.repairs = RepairLog("compensation_cholesky")
        self.last_conditioning: dict[str, float] | None = None   # of the last G solve

    def __call__(self, linear, inputs, pruned):
        if len(pruned):
            g = obs_matrix(inputs.gram, self.damping)
            self.last_conditioning = conditioning(g)
            linear.weight.data.copy_(obs_update(linear.weight.data, inputs.gram, pruned,
                                                self.damping, self.repairs, g))

    def report(self):
        return self.repairs.report()


class BiasCompensation(Compensator):
    """FLAP: add the pruned channels' mean contribution ``W[:, p] x_mean[p]`` to the bias
    (the layer gets a bias if it had none)."""

    needs_gram = False

    def __call__(self, linear, inputs, pruned):
        if not len(pruned):
            return
        shift = (linear.weight.data.double()[:, pruned] @ inputs.mean[pruned]).to(
            linear.weight.dtype)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features,
                                                   dtype=linear.weight.dtype))
        linear.bias.data += shift


# -- physical removal -------------------------------------------------------------------------

def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None, cls: type[nn.Linear] = nn.Linear
                  ) -> nn.Linear:
    """A new linear (of class ``cls``) keeping output ``rows`` and input ``cols`` (None: all)."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = cls(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
              dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data if rows is None else linear.bias.data[rows])
    return new


def kept_channels(num_structures: int, group_size: int, removed: Sequence[int]) -> torch.Tensor:
    """Channel indices of the kept structures (each ``group_size`` consecutive channels)."""
    mask = torch.ones(num_structures, dtype=torch.bool)
    mask[list(removed)] = False
    return (torch.arange(num_structures * group_size).reshape(num_structures, group_size)
            [mask].flatten())


def removed_channels(num_structures: int, group_size: int,
                     removed: Sequence[int]) -> torch.Tensor:
    chans = torch.arange(num_structures * group_size).reshape(num_structures, group_size)
    return chans[list(removed)].flatten() if len(removed) else torch.zeros(0, dtype=torch.long)

