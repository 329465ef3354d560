"""Gradient descent on a deep linear network ``W = W_L ... W_1`` without autograd.

Every loss of the DLN tasks is a function of the end-to-end matrix only, so the layer
gradients follow from the chain rule of a matrix product: with ``P_l = W_l ... W_1``
(``P_0 = I``) and ``Q_l`` the gradient with respect to ``P_l`` (``Q_L = dloss/dW``),

    grad_l = Q_l P_{l-1}^T,    Q_{l-1} = W_l^T Q_l.

These are the very products (in the same order) that autograd forms for
``W_L @ (... @ (W_2 @ W_1))``, but written into preallocated buffers with BLAS calls
that accumulate the step into the weight (``W_l += -lr_l Q_l P_{l-1}^T``), which removes
autograd's graph, its temporaries and most of the Python dispatch: on the 100 x 100
problems the paper times, that overhead was most of a step.

A step is split in two so that everything recorded at iteration t belongs to the same
iterate: :meth:`ProductGD.forward` forms ``W(t)`` and the loss at it, the caller records
them (and may stop there), then :meth:`ProductGD.update` moves every layer to ``t + 1``.
:class:`AutogradGD` is the same interface on ``torch.autograd.grad`` (the reference, and
the path for any model or task the closed form does not cover).
"""

from __future__ import annotations

import torch
from torch import nn


class EndToEndLoss:
    """A loss of the end-to-end matrix with its gradient, in preallocated buffers.

    Masked half-MSE ``1/2 sum (mask (W - M*))^2 / sum(mask)`` (factorization, completion,
    ratings) or sensing ``1/2 sum_i (<A_i, W> - y_i)^2``. :meth:`__call__` returns the
    loss and the gradient *up to* :attr:`scale` (the constant factor is folded into the
    step sizes, which saves one pass over the matrix).
    """

    def __init__(self, batch: dict[str, torch.Tensor]):
        target = batch["target"]
        self.target = target
        self.residual = torch.empty_like(target)
        if "A" in batch:
            self.operators = batch["A"].reshape(len(batch["y"]), -1)
            self.y = batch["y"]
            self.measured = torch.empty_like(self.y)
            self.grad = torch.empty_like(target)
            self.mask, self.scale = None, 1.0
            return
        self.operators = None
        mask = batch["mask"]
        self.scale = 1.0 / float(mask.sum())
        binary = bool(((mask == 0) | (mask == 1)).all())
        # all ones: nothing to mask; 0/1: masking once gives both loss and gradient
        self.mask = None if bool((mask == 1).all()) else mask
        self.grad_mask = None if binary else mask

    def __call__(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``(loss, g)`` at ``w``; the gradient is ``scale * g``."""
        if self.operators is not None:
            torch.mv(self.operators, w.view(-1), out=self.measured)
            self.measured.sub_(self.y)
            torch.mv(self.operators.T, self.measured, out=self.grad.view(-1))
            return 0.5 * float(torch.dot(self.measured, self.measured)), self.grad
        r = torch.sub(w, self.target, out=self.residual)
        if self.mask is not None:
            r.mul_(self.mask)
        # scaled as a Python float: one tensor operation less per step
        loss = (0.5 * self.scale) * float(torch.dot(r.view(-1), r.view(-1)))
        if self.grad_mask is not None:  # a weighted mask: d/dW of (m R)^2 / 2 is m^2 R
            r.mul_(self.grad_mask)
        return loss, r


def plain_weights(model: nn.Module, linears) -> list[torch.Tensor] | None:
    """The layer weights (first to last) when every layer is a bias-free ``nn.Linear``
    (subclasses that keep its forward, e.g. a resized layer, count; the closed form's
    assumption), else None."""
    layers = list(linears)
    if not all(isinstance(lin, nn.Linear) and type(lin).forward is nn.Linear.forward
               and lin.bias is None for lin in layers):
        return None
    return [lin.weight for lin in layers]


class ProductGD:
    """Closed-form plain GD on ``W_L ... W_1`` (see the module docstring).

    ``weights``: the layer parameters, first to last (updated in place); ``lrs``: one step
    size per layer.
    """

    def __init__(self, weights: list[torch.Tensor], lrs: list[float],
                 batch: dict[str, torch.Tensor]):
        self.weights = [w.detach() for w in weights]  # same storage, no autograd history
        self.loss_fn = EndToEndLoss(batch)
        self.steps = [-lr * self.loss_fn.scale for lr in lrs]
        w = self.weights
        # P_l = W_l P_{l-1}: prefix products (P_1 is W_1 itself), the last one is W
        self.prefix = [w[0]] + [torch.empty(wl.shape[0], w[0].shape[1], dtype=wl.dtype)
                                for wl in w[1:]]
        # Q_{l-1} = W_l^T Q_l for l = L..2 (Q_L is the loss gradient)
        self.back = [torch.empty(wl.shape[1], w[0].shape[1], dtype=wl.dtype) for wl in w[1:]]
        self.grad: torch.Tensor | None = None

    @property
    def product(self) -> torch.Tensor:
        """``W`` at the iterate of the last :meth:`forward` (valid until the next one)."""
        return self.prefix[-1]

    @torch.no_grad()
    def forward(self) -> float:
        for i in range(1, len(self.weights)):
            torch.mm(self.weights[i], self.prefix[i - 1], out=self.prefix[i])
        loss, self.grad = self.loss_fn(self.prefix[-1])
        return loss

    @torch.no_grad()
    def update(self) -> None:
        """One GD step from the iterate of the last :meth:`forward`."""
        q = self.grad
        for i in range(len(self.weights) - 1, 0, -1):
            w = self.weights[i]
            # Q_{i-1} from the old W_i, then W_i's own step (needs only Q_i and P_{i-1})
            torch.mm(w.T, q, out=self.back[i - 1])
            w.addmm_(q, self.prefix[i - 1].T, alpha=self.steps[i])
            q = self.back[i - 1]
        self.weights[0].add_(q, alpha=self.steps[0])


class AutogradGD:
    """The same two-phase step with ``torch.autograd.grad`` on ``task.loss``."""

    def __init__(self, model: nn.Module, adapter, task, weights: list[torch.Tensor],
                 lrs: list[float], batch: dict[str, torch.Tensor]):
        self.model, self.adapter, self.task, self.batch = model, adapter, task, batch
        self.weights, self.lrs = weights, lrs
        self.loss: torch.Tensor | None = None
        self.product: torch.Tensor | None = None

    def forward(self) -> float:
        self.loss = self.task.loss(self.model, self.adapter, self.batch)
        with torch.no_grad():
            self.product = self.model.end_to_end().detach()
        return float(self.loss.detach())

    def update(self) -> None:
        grads = torch.autograd.grad(self.loss, self.weights)
        with torch.no_grad():
            for weight, grad, lr in zip(self.weights, grads, self.lrs):
                weight.sub_(grad, alpha=lr)
        self.loss = None
