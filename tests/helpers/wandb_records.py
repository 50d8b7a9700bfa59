"""Reads back the history an offline W&B run wrote to its ``run-<id>.wandb`` file.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version), then records in the
LevelDB log format (32 KiB blocks; each chunk a 7-byte header: CRC32C, little-endian length, type FULL=1 /
FIRST=2 / MIDDLE=3 / LAST=4; a block tail shorter than a header is zero padding), each record a
``wandb_internal_pb2.Record`` protobuf.  wandb itself no longer ships a Python reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out: list[bytes] = []
    pos = _HEADER
    pending = b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # zero padding at a block's end
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            pos += left_in_block - _HEADER  # preallocated zeros
            continue
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row of the offline run in ``run_dir`` (the folder holding ``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for raw in records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            target = row
            for k in keys[:-1]:  # a logged object (a table) is stored field by field under its key
                target = target.setdefault(k, {})
            target[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def alerts(run_dir: str | Path) -> list[tuple[str, str, str]]:
    """Every ``wandb.alert`` of the offline run in ``run_dir`` as ``(title, text, level)``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    out = []
    for raw in records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "alert":
            out.append((record.alert.title, record.alert.text, record.alert.level))
    return out
