"""Bucket aggregates already read, kept in memory so a run is not scanned twice.

Rows are appended to a run file in step order, so a bucket of steps that ends before the file's last step never
changes again: its aggregate is kept and the next request (the page reading the series again, another page on
the same run) reads only the buckets after it.  Metrics may be logged late for an earlier step (a validation
loss), so a metric's kept buckets are checked against the rows added since (one range scan of the new rows) and
dropped if any fell into them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from noisescale.store.reader import RunReader

__all__ = ["BucketCache", "file_identity"]


def file_identity(reader: RunReader) -> tuple[Any, ...]:
    """What tells one run file from another, even one later written under the same name: the file's device and
    inode, and the run id recorded in it."""
    st = os.stat(reader.path)
    run_id = reader.query("SELECT id FROM run LIMIT 1")[0][0]
    return (st.st_dev, st.st_ino, run_id)


class BucketCache:
    """Complete buckets' aggregates, per ``(file, series, bucket width)``; thread-safe, least recently used out.

    Args:
        max_entries: series kept at most.
        max_buckets: buckets kept per series at most (a series asked with more is not kept).
    """

    def __init__(self, max_entries: int = 256, max_buckets: int = 4096) -> None:
        self.max_entries = max_entries
        self.max_buckets = max_buckets  # per series: bounds the memory whatever `points` a request asks
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, dict[int, Any]] = OrderedDict()
        self._marks: dict[Hashable, int] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> dict[int, Any]:
        """The kept buckets of ``key`` (bucket index -> aggregate row), a copy."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return {}
            self._entries.move_to_end(key)
            return dict(found)

    def mark(self, key: Hashable) -> int | None:
        """The number recorded with ``key``'s buckets (a metric's last row id when they were read)."""
        with self._lock:
            return self._marks.get(key)

    def put(self, key: Hashable, buckets: dict[int, Any], *, mark: int | None = None) -> None:
        """Keep ``buckets`` (complete ones only) for ``key``, beside those already kept."""
        with self._lock:
            entry = self._entries.setdefault(key, {})
            if len(entry) + len(buckets) > self.max_buckets:
                return
            entry.update(buckets)
            self._entries.move_to_end(key)
            if mark is not None:
                self._marks[key] = mark
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self._marks.pop(old, None)

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._marks.pop(key, None)
