"""Speed, memory and FLOP measurement of a model's forward pass (``make bench``).

Pure helpers, no experiment logic:

- FLOPs: :func:`count_flops` runs a callable under ``torch.utils.flop_counter`` (matrix
  products and attention as executed, including the CPU attention kernel the stock
  counter misses); :func:`linear_flops` is the hand count ``2 * in * out * tokens`` summed
  over a model's ``nn.Linear`` modules.
- time: :func:`interleaved_times` runs several callables in turns (round ``i`` times every
  callable once, in a rotating order) so that slow drifts of a shared machine hit all of
  them alike; :func:`median` and :func:`paired_speedup` (median over rounds of the
  per-round ratio) summarise them; :func:`busy_machine_warning` says when other work
  competes for the cores.
- memory: :class:`TensorMemory` records the peak bytes of tensors created during a call
  (activations; the weights and inputs that existed before are not counted) and
  :func:`peak_rss_bytes` the process's resident-set high-water mark.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# -- FLOPs -----------------------------------------------------------------------------------


def _cpu_attention_mapping() -> dict:
    """Formulas for attention kernels ``FlopCounterMode`` does not know (CPU flash)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    ops = [getattr(aten, n) for n in ("_scaled_dot_product_flash_attention_for_cpu",)
           if hasattr(aten, n)]
    return {op: cpu_sdpa for op in ops}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as executed (a multiply-add counts 2): matrix products and
    scaled-dot-product attention (``4 * batch * heads * q_len * kv_len * head_dim``,
    the full square even for causal masks). Element-wise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def linear_flops(model: nn.Module, tokens: int) -> int:
    """Hand count: ``2 * in * out`` per token for every ``nn.Linear`` (no bias, no
    attention products). ``tokens``: rows the linears see (batch x sequence)."""
    return sum(2 * m.in_features * m.out_features * tokens
               for m in model.modules() if isinstance(m, nn.Linear))


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """``Q K^T`` and ``softmax(.) V`` of one attention layer: ``4 b h q k d``."""
    return 4 * batch * heads * q_len * kv_len * head_dim


def param_count(model: nn.Module) -> int:
    """Parameters, tied tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (tied tensors once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- time ------------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def paired_speedup(reference: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of ``reference[i] / other[i]`` (times measured in the same round):
    the load of a shared machine changes slowly, so pairing cancels most of it."""
    if len(reference) != len(other) or not reference:
        raise ValueError("paired_speedup needs two equally long, non-empty series")
    return median([r / o for r, o in zip(reference, other)])


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` (inf for a zero denominator): a speed-up or FLOP limit."""
    return math.inf if denominator == 0 else numerator / denominator


def calls_for(seconds_per_call: float, target_seconds: float, cap: int = 1000) -> int:
    """How many calls one timed sample should hold so that it lasts ``target_seconds``
    (short calls are timed in groups; the timer's resolution stops mattering)."""
    if seconds_per_call <= 0:
        return cap
    return max(1, min(cap, math.ceil(target_seconds / seconds_per_call)))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, *,
                      calls: dict[str, int] | int = 1, warmup: int = 1,
                      device: torch.device | str = "cpu",
                      clock: Callable[[], float] = time.perf_counter,
                      cpu_clock: Callable[[], float] = time.process_time
                      ) -> dict[str, dict[str, list[float]]]:
    """Per callable: ``wall`` and ``cpu`` seconds per call over ``repeats`` rounds.

    Every round runs each callable once (``calls`` calls timed together), starting at a
    different callable each round so that none is always first after another's
    cache-warm state. ``warmup`` untimed calls each first."""
    names = list(fns)
    per = calls if isinstance(calls, dict) else {n: calls for n in names}
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            k = per[name]
            wall, cpu = clock(), cpu_clock()
            for _ in range(k):
                fns[name]()
            synchronize(device)
            out[name]["wall"].append((clock() - wall) / k)
            out[name]["cpu"].append((cpu_clock() - cpu) / k)
    return out


def busy_machine_warning() -> str | None:
    """One line when the 1-minute load average reaches the number of cores, else None.

    Timings taken then are not an idle machine's: on 2 cores the same paired speed-ups
    moved by up to 16 % between a busy and an idle machine."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):      # no load average on this platform
        return None
    cores = os.cpu_count() or 1
    if load < cores:
        return None
    return (f"warning: load average {load:.1f} on {cores} cores: other work competes for them, "
            "so these timings may be off by 15 % or more; time again when the machine is idle")


def timed_in_turns(fns: dict[str, Callable[[], object]], repeats: int,
                   device: torch.device | str = "cpu", target_s: float = 0.25
                   ) -> dict[str, dict[str, list[float]]]:
    """:func:`interleaved_times` with the calls per sample chosen from one untimed call
    of each (which is also the warm-up), so that each sample lasts about ``target_s``."""
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        synchronize(device)
        calls[name] = calls_for(time.perf_counter() - start, target_s)
    return interleaved_times(fns, repeats, calls=calls, warmup=0, device=device)


# -- memory ----------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far: Linux ``VmHWM`` (the high-water mark
    of this program's own memory), else ``ru_maxrss``. (Linux's ``ru_maxrss`` also
    carries the parent's RSS into a child started by fork/vfork + exec, so a subprocess
    of a big process would report the parent's size.)"""
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux ``VmRSS``; 0 elsewhere)."""
    return 1024 * (_proc_status_kib("VmRSS") or 0)


class TensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the ``with`` block.

    Every operator's outputs are followed until their storage is freed; storages that
    existed before (weights, inputs, views of them) are not counted. ``peak`` is thus the
    activation high-water mark of a forward pass, independent of the allocator and of
    other processes (unlike the RSS). Slows the call down; do not time under it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out
