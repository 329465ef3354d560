"""Seeds derived from names: the same parts give the same seed in every process and on
every resume, whatever ran before."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed (what numpy accepts) that depends only on ``parts`` (e.g. run seed,
    stage index, step)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")
