"""The floor of a compression method's cost (``make bench``, docs/bench.md): what the
method cannot avoid, timed in the same process as the method itself.

- ``forward_s``: one forward pass of the calibration set through the dense model (the
  stage's sample count and batch size; none for plain SVD, which needs no data);
- ``linalg_s``: the factorisations and solves the method must do, on matrices of the
  model's shapes and the method's precision:

  * ``svd``: one SVD of every compressed weight;
  * ``svd_llm``, ``spectrum`` (shortlist): per weight, the Cholesky factor ``L`` of its
    input Gram matrix, the SVD of ``W L`` and the triangular solve for ``V^T L^{-1}``
    (float64, as the method computes them);
  * ``numerical_pruning``: per layer that consumes the pruned structures (attention output
    and MLP down projection), one Cholesky of its ``D x D`` mask Hessian for the score and
    one of its ``2 X^T X + gamma I`` for the group-OBS compensation (float64).

Not in the floor: accumulating ``X^T X`` on the calibration tokens, forming the mask
Hessian, the pruned layers' copies, Python. The Gram accumulation is timed beside the
floor (``gram_s``: once per distinct layer input, in the method's precision: float32 for
the whitened SVDs, float64 for numerical pruning) because it is what most of the gap
between a calibrated method and its floor is made of.
"""

from __future__ import annotations

import time

import torch

FLOOR_METHODS = ("svd", "svd_llm", "spectrum", "numerical_pruning")


def spd(n: int, seed: int = 0) -> torch.Tensor:
    """A well-conditioned n x n float64 SPD matrix (a stand-in Gram matrix)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + 8, generator=g, dtype=torch.float64)
    return x @ x.T / n + torch.eye(n, dtype=torch.float64)


def calibration_shape(stage) -> tuple[int, int]:
    """(samples, batch size) of the stage's calibration (every calibrated stage has one)."""
    return int(stage.calibration.num_samples), int(stage.calibration.batch_size)


@torch.inference_mode()
def forward_seconds(model, adapter, inputs: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        adapter.logits(model, inputs[i:i + batch_size])
    return time.perf_counter() - start


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor) -> None:
    chol = torch.linalg.cholesky(gram)
    _, _, vh = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    torch.linalg.solve_triangular(chol.T, vh.T, upper=True)


def consuming_linears(model, adapter) -> list[torch.nn.Module]:
    """The layers whose input channels numerical pruning scores and compensates."""
    out = []
    for block in adapter.blocks(model):
        roles = adapter.block_linears(block)
        out += [roles[r] for r in ("o", "down") if r in roles]
    return out


@torch.inference_mode()
def linalg_seconds(method: str, model, adapter) -> float:
    if method == "numerical_pruning":
        layers = consuming_linears(model, adapter)
        grams = {n: spd(n) for n in {lin.in_features for lin in layers}}
        start = time.perf_counter()
        for lin in layers:
            for _ in range(2):  # the score's Hessian and the compensation's G
                torch.linalg.cholesky(grams[lin.in_features])
        return time.perf_counter() - start
    layers = list(adapter.compressible_linears(model).values())
    if method == "svd":
        start = time.perf_counter()
        for lin in layers:
            torch.linalg.svd(lin.weight, full_matrices=False)
        return time.perf_counter() - start
    grams = {n: spd(n) for n in {lin.in_features for lin in layers}}
    start = time.perf_counter()
    for lin in layers:
        whitened_svd(lin.weight, grams[lin.in_features])
    return time.perf_counter() - start


#: the dtype each method accumulates its X^T X in, and the roles whose inputs it needs
GRAM = {"svd_llm": (torch.float32, ("q", "o", "gate", "down")),
        "spectrum": (torch.float32, ("q", "o", "gate", "down")),
        "numerical_pruning": (torch.float64, ("o", "down"))}


@torch.inference_mode()
def gram_seconds(method: str, model, adapter, tokens: int, chunk: int = 2048) -> float:
    """One ``X^T X`` per distinct layer input of every block over ``tokens`` rows (random
    rows, ``chunk`` at a time: the cost depends on the shapes only)."""
    if method not in GRAM:
        return 0.0
    dtype, roles = GRAM[method]
    widths = [adapter.block_linears(block)[r].in_features for block in adapter.blocks(model)
              for r in roles if r in adapter.block_linears(block)]
    rows = {n: torch.randn(min(chunk, tokens), n, dtype=dtype) for n in set(widths)}
    start = time.perf_counter()
    for n in widths:
        gram = torch.zeros(n, n, dtype=dtype)
        for done in range(0, tokens, chunk):
            x = rows[n][:min(chunk, tokens - done)]
            gram.addmm_(x.T, x)
    return time.perf_counter() - start


def floor_seconds(method: str, stage, model, adapter, inputs: torch.Tensor) -> dict:
    """``forward_s``, ``linalg_s`` and their sum ``floor_s`` (wall) for ``method`` on the
    dense ``model`` (``inputs``: at least the stage's calibration samples), and
    ``floor_cpu_s`` (process CPU time, steadier on a shared machine)."""
    cpu = time.process_time()
    forward = 0.0
    if method != "svd":
        samples, batch_size = calibration_shape(stage)
        forward = forward_seconds(model, adapter, inputs[:samples], batch_size)
    linalg = linalg_seconds(method, model, adapter)
    out = {"forward_s": forward, "linalg_s": linalg, "floor_s": forward + linalg,
           "floor_cpu_s": time.process_time() - cpu}
    if method in GRAM:
        samples, _ = calibration_shape(stage)
        out["gram_s"] = gram_seconds(method, model, adapter, samples * inputs.shape[1])
    return out
