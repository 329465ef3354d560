"""Read an offline W&B run (``wandb/offline-run-*/run-*.wandb``) without syncing it.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then
LevelDB-log framing (32 KiB blocks; each chunk = crc32 (4), length (2), type (1), data)
around serialized ``wandb_internal_pb2.Record`` messages. wandb itself no longer ships a
Python reader, so this is the few lines it takes; it checks the header and the framing
and leaves the checksums to wandb (a damaged file fails to parse as protobuf).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:  # block trailer: zero padding
            pos += room
            continue
        _crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += room
            continue
        body = data[pos + CHUNK.size:pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body
            pending = b""


@dataclass
class OfflineRun:
    """What a run logged: its config (nested), history rows, metric definitions,
    summary, and the files it saved (paths relative to the run's ``files/``)."""

    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)

    def series(self, key: str, step_key: str) -> list[tuple[float, Any]]:
        """(step, value) of every row holding ``key``."""
        return [(row.get(step_key), row[key]) for row in self.history if key in row]


def read_run(folder: str | Path) -> OfflineRun:
    """Parse ``folder`` (an ``offline-run-*`` folder or the ``.wandb`` file in it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(folder)
    if path.is_dir():
        path = next(path.glob("*.wandb"))
    run = OfflineRun()
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({item.key or "/".join(item.nested_key):
                                json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            run.job_type, run.tags = record.run.job_type, list(record.run.tags)
        elif kind == "metric":
            m = record.metric
            run.metrics[m.name or m.glob_name] = {
                "step_metric": m.step_metric, "glob": bool(m.glob_name),
                "summary": [s for s in ("min", "max", "last", "mean", "best")
                            if getattr(m.summary, s, False)]}
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "artifact":
            run.artifacts.append(record.artifact.name)
    return run
