"""Calibration: activation statistics collected block by block with forward hooks.

Methods that compress or prune using data (SVD-LLM whitening, ASVD, numerical
pruning, Wanda, FLAP, ...) need statistics of each linear layer's *inputs* on a
few calibration samples, computed on the model as already changed by the
earlier blocks. :class:`BlockwiseCalibration` does that with bounded memory:

1. it runs the model once until the first block and keeps that block's inputs
   (hidden states plus whatever keyword arguments the architecture passes, e.g.
   rotary position embeddings and the attention mask);
2. for each block in order, it hands the block to the method, which collects the
   statistics it needs (:meth:`collect`) and changes the block;
3. it then runs the *changed* block on the kept inputs to produce the next
   block's inputs, and drops the statistics of the finished block (or, for
   statistics of the dense model, passes on the outputs the block had before the
   method changed it: ``collect(..., keep_outputs=True)``).

So peak memory is the model, the hidden states of the calibration samples, and
one block's statistics. Statistics are small classes with one interface
(:class:`InputStatistic`), so a method's config can pick which it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compresslab.models.architecture import ArchitectureAdapter


class InputStatistic:
    """Accumulates a statistic of a linear layer's inputs ``x`` (rows = tokens)."""

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError


#: converted copies of a layer's inputs are made this many elements at a time (float64:
#: 128 MiB), not for a whole batch at once (16 sequences x 2048 tokens x 5632 channels of
#: a 1B model's down_proj would be 1.5 GiB per copy)
CHUNK_ELEMENTS = 1 << 24


def row_chunks(x: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``x`` as rows (tokens x features) in ``dtype``, a bounded slice at a time when it
    must be converted (no copy at all when it already has ``dtype``)."""
    x = x.reshape(-1, x.shape[-1])
    if x.dtype == dtype:
        yield x
        return
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, x.shape[0], step):
        yield x[start:start + step].to(dtype)


class Gram(InputStatistic):
    """``C = X^T X`` summed over tokens (``X``: tokens x in), and the token count.

    Accumulated in ``dtype`` (float32 by default, as the SVD-LLM reference does;
    factor the result in float64)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype, self.gram, self.count = dtype, None, 0

    def update(self, x):
        for rows in row_chunks(x, self.dtype):
            self.gram = rows.T @ rows if self.gram is None else self.gram.addmm_(rows.T, rows)
            self.count += rows.shape[0]


class ChannelMoments(InputStatistic):
    """Per input channel: mean, mean of |x|, mean of x^2 (float64), token count."""

    def __init__(self):
        self.sum = self.abs_sum = self.sq_sum = None
        self.count = 0

    def update(self, x):
        for rows in row_chunks(x, torch.float64):
            parts = (rows.sum(0), rows.abs().sum(0), rows.pow(2).sum(0))
            if self.sum is None:
                self.sum, self.abs_sum, self.sq_sum = parts
            else:
                self.sum += parts[0]
                self.abs_sum += parts[1]
                self.sq_sum += parts[2]
            self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over all calibration tokens."""
        return (self.sq_sum / self.count - self.mean.pow(2)).clamp_min(0)

    @property
    def l2_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens (Wanda's activation norm)."""
        return self.sq_sum.sqrt()


class _StopForward(Exception):
    pass


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class BlockwiseCalibration:
    """Walks the model's blocks in order on a fixed set of calibration batches."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, batches: list):
        self.model, self.adapter = model, adapter
        self.blocks_list = adapter.blocks(model)
        self.inputs = self._capture_first_block_inputs(batches)
        self._kept: tuple[nn.Module, list[torch.Tensor]] | None = None

    @torch.no_grad()
    def _capture_first_block_inputs(self, batches) -> list[tuple[tuple, dict]]:
        captured: list[tuple[tuple, dict]] = []

        def grab(_module, args, kwargs):
            captured.append((args, kwargs))
            raise _StopForward

        handle = self.blocks_list[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for batch in batches:
                try:
                    self.adapter.logits(self.model, batch)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def run_block(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs on the current inputs."""
        return [_first(block(*args, **kwargs)) for args, kwargs in self.inputs]

    @torch.no_grad()
    def collect(self, block: nn.Module, layers: dict[str, nn.Module],
                make_stat: Callable[[], InputStatistic],
                keep_outputs: bool = False) -> dict[str, InputStatistic]:
        """Run ``block`` on the current inputs with a statistic on each of ``layers``' inputs.

        Layers fed the very same tensor (LLaMA's q/k/v, gate/up) share one statistic
        object, updated once per batch. ``keep_outputs``: keep the block's outputs so that
        :meth:`advance` feeds them to the next block instead of running the block again:
        either the block stays unchanged until then, or the caller wants the next block
        to see the *unchanged* block's outputs (dense-model statistics). Without it, the
        block's forward stops as soon as every layer of ``layers`` has had its input (the
        rest of the block would only compute outputs nobody reads)."""
        stats: dict[str, InputStatistic] = {}
        owner: dict[str, str] = {}                         # layer -> layer it shares with
        seen: dict[int, tuple[torch.Tensor, str]] = {}     # this batch's inputs, first layer
        reached: set[str] = set()                          # layers fed in this batch

        def hook(name: str, x: torch.Tensor) -> None:
            update(name, x)
            reached.add(name)
            if not keep_outputs and len(reached) == len(layers):
                raise _StopForward

        def update(name: str, x: torch.Tensor) -> None:
            hit = seen.get(id(x))
            first = hit[1] if hit is not None and hit[0] is x else None
            if name not in owner:
                owner[name] = first or name
                stats[name] = stats[first] if first else make_stat()
            elif owner[name] != (first or name):
                raise RuntimeError(f"calibration: layer {name} shared its input with "
                                   f"{owner[name]} in one batch but not in another")
            if first is None:
                seen[id(x)] = (x, name)
                stats[name].update(x)

        handles = [module.register_forward_hook(
            lambda _m, inp, _out, name=name: hook(name, inp[0]))
            for name, module in layers.items()]
        outputs = []
        try:
            for args, kwargs in self.inputs:
                seen.clear()
                reached.clear()
                try:
                    out = _first(block(*args, **kwargs))
                except _StopForward:
                    continue
                if keep_outputs:
                    outputs.append(out)
        finally:
            seen.clear()
            for h in handles:
                h.remove()
        self._kept = (block, outputs) if keep_outputs else None
        return {name: stats[name] if name in stats else make_stat() for name in layers}

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Replace the kept inputs by ``block``'s outputs (feed the next block)."""
        kept, self._kept = self._kept, None
        outputs = kept[1] if kept is not None and kept[0] is block else self.run_block(block)
        self.inputs = [((out, *args[1:]), kwargs)
                       for out, (args, kwargs) in zip(outputs, self.inputs)]

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        """Yield ``(index, block)``; after the caller is done with a block (and may have
        changed it), its outputs become the next block's inputs."""
        for index, block in enumerate(self.blocks_list):
            yield index, block
            if index + 1 < len(self.blocks_list):
                self.advance(block)


def squared_gradients(model: nn.Module, adapter: ArchitectureAdapter, task, batches: list,
                      layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per output row of each layer: ``sum over batches and columns of (dL/dW_ij)^2``.

    FWSVD's Fisher row importance. It needs one backward pass of the task loss through
    the whole model per batch; only the selected layers' weights require gradients, and
    the result is one vector of ``out_features`` (float64) per layer.
    """
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: layer.weight for name, layer in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {name: torch.zeros(w.shape[0], dtype=torch.float64) for name, w in weights.items()}
    try:
        with torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(task.loss(model, adapter, batch),
                                            list(weights.values()))
                for name, g in zip(weights, grads):
                    sums[name] += g.double().pow(2).sum(1)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return sums


#: which model a block's input statistics are collected on (CalibrationSettings.inputs)
CALIBRATION_INPUTS = ("dense", "compressed")


@dataclass
class CalibrationSettings:
    """Which calibration samples a method sees (the same for every method by default).

    ``num_samples`` sequences (or images) of the train split, ``batch_size`` per forward
    pass, the first ``seq_len`` tokens of each text block (null: the whole block), drawn
    with ``seed``. ``data``: another datamodule to draw them from (its train split,
    tokenized with the run's tokenizer); null uses the run's own dataset.
    ``inputs``: ``dense`` collects every block's statistics on the uncompressed model's
    activations (what the SVD-LLM and ASVD authors' code does); ``compressed`` on the
    activations of the already-compressed earlier blocks (docs/spectrum.md).
    """

    num_samples: int = 64
    batch_size: int = 16
    seq_len: int | None = None
    seed: int = 0
    data: Any | None = None
    inputs: str = "dense"

    def check(self, run_data: Any) -> None:
        from compresslab.errors import ConfigError

        for what in ("num_samples", "batch_size"):
            if int(getattr(self, what)) < 1:
                raise ConfigError(f"calibration.{what} must be at least 1, "
                                  f"got {getattr(self, what)}")
        if self.inputs not in CALIBRATION_INPUTS:
            raise ConfigError(f"calibration.inputs must be {' | '.join(CALIBRATION_INPUTS)}, "
                              f"got {self.inputs!r}")
        block = getattr(self.data or run_data, "block_size", None)
        if self.seq_len is not None and (self.seq_len < 2 or (block and self.seq_len > block)):
            raise ConfigError(f"calibration.seq_len={self.seq_len} must lie in [2, block_size="
                              f"{block}]")
        if self.data is not None:
            self.data.check()

    def batches(self, run_data: Any, with_labels: bool = False) -> list:
        """The calibration batches: model inputs, or whole task batches ``with_labels``."""
        from compresslab.data.base import calibration_batches

        data = run_data
        if self.data is not None:
            data = self.data
            if not data._splits:
                data.load(tokenizer=run_data.shared_tokenizer())
        batches = calibration_batches(data, self.num_samples, self.batch_size, self.seed,
                                      with_labels)
        if self.seq_len is not None:  # text blocks only (check: seq_len within block_size)
            batches = [b[:, :self.seq_len] for b in batches]
        return batches
