"""How many torch threads a run uses when the config does not say (``threads: null``).

Models below :data:`SMALL_MODEL_PARAMS` run with one thread: their matrix products are
too small to split well, so a second thread mostly adds synchronisation, and on a shared
machine (other processes on the cores) that synchronisation waits for descheduled
threads. Measured with ``make bench`` (part ``threads``, docs/bench.md): one training
step of llama_tiny / vit_tiny took several times longer with 2 threads than with 1 on a
busy 2-core machine. Larger models keep torch's default (one thread per core).
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_MODEL_PARAMS = 20_000_000
#: torch's own default in this process (one per core), read before any run changes it
DEFAULT_THREADS = torch.get_num_threads()


def run_threads(threads: int | None, model: nn.Module) -> int:
    """``threads`` when set, else 1 for a model under :data:`SMALL_MODEL_PARAMS` parameters
    (``model`` may live on the meta device) and torch's default otherwise."""
    from compresslab.models.utils import count_params

    if threads:
        return int(threads)
    return 1 if count_params(model) < SMALL_MODEL_PARAMS else DEFAULT_THREADS
