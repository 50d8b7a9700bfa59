"""Series read from a run file, cut down on the server to what a chart can show, with every extreme kept.

A series of at most ``points`` rows is returned as stored.  A longer one is cut into buckets of ``w`` consecutive
steps (``w`` the smallest power of two giving at most ``points / 2`` buckets, aligned on multiples of ``w`` so a
growing run keeps its bucket edges); each bucket gives two points: its first step with the minimum of each column
over the bucket, and its last step with the maximum.  So the chart's envelope is exact: no spike is lost, and no
value is made up (every value shown is one that was recorded).  Inside a bucket the order of the minimum and the
maximum is not kept; a bucket is about two pixels wide at the default ``points``.

Each bucket is one SQL aggregate over a step range of the primary key (no sort, no Python loop over rows), so a
run of a million steps is read in a fraction of a second per column.  Call these inside ``reader.snapshot()`` so
all the queries of one answer see the same state of a file that is still being written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from noisescale.dashboard.buckets import BucketCache, file_identity
from noisescale.store.reader import MEASUREMENT_FIELDS, RunReader
from noisescale.types import COLUMNS

__all__ = ["LAYER_AGGREGATES", "bucket_width", "layer_grid", "measurement_series", "metric_series"]

LAYER_AGGREGATES = {"max": "max", "min": "min", "mean": "avg"}
_IN_CHUNK = 400  # steps per `IN (...)` list (well under SQLite's variable limit)


def bucket_width(first: int, last: int, points: int) -> int:
    """The smallest power of two ``w`` such that steps ``first..last`` fall in at most ``points`` buckets
    ``[k*w, (k+1)*w)``.

    >>> bucket_width(1, 1000, 1000), bucket_width(0, 999, 500), bucket_width(0, 1_000_000, 1000)
    (1, 2, 1024)
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    w = 1
    while last // w - first // w + 1 > points:
        w *= 2
    return w


def measurement_series(
    reader: RunReader,
    columns: Sequence[str],
    *,
    points: int,
    after: int | None = None,
    cache: BucketCache | None = None,
) -> dict[str, Any]:
    """Whole-model measurement ``columns`` (see ``MEASUREMENT_FIELDS``) of the steps after ``after``; buckets that
    ``cache`` holds are not read again, complete ones read now are kept there.

    Returns:
        ``{"rows", "downsampled", "bucket_steps", "step", "examples", "wall_time", "values": {column: [...]}}``:
        ``rows`` counts the stored rows the points stand for.
    """
    for c in columns:
        if c not in MEASUREMENT_FIELDS:
            raise ValueError(f"unknown measurement column {c!r}")
    lo = -1 if after is None else after
    cols = "".join(f", {c}" for c in columns)
    rows = reader.query(
        f"SELECT step, examples, wall_time{cols} FROM measurements WHERE step > ? ORDER BY step LIMIT ?",
        (lo, points + 1),
    )
    if len(rows) <= points:
        return _points(rows, columns, downsampled=False, width=1, n_rows=len(rows))
    first = int(rows[0][0])
    last = int(reader.query("SELECT max(step) FROM measurements")[0][0])
    w = bucket_width(first, last, max(1, points // 2))
    aggs = "".join(f", min({c}), max({c})" for c in columns)
    sql = f"SELECT count(*), min(step), max(step){aggs} FROM measurements WHERE step >= ? AND step < ?"
    key = None if cache is None or after is not None else (file_identity(reader), "measurements", tuple(columns), w)
    known = cache.get(key) if cache is not None and key is not None else {}
    complete: dict[int, Any] = {}
    buckets = []
    for k in range(first // w, last // w + 1):
        r = known.get(k)
        if r is None:
            r = reader.query(sql, (max(k * w, lo + 1), (k + 1) * w))[0]
            if (k + 1) * w <= last:  # a later step is stored: rows come in step order, this bucket is final
                complete[k] = r
        if r[0]:
            buckets.append(r)
    if cache is not None and key is not None and complete:
        cache.put(key, complete)
    edges = sorted({int(b[1]) for b in buckets} | {int(b[2]) for b in buckets})
    x: dict[int, tuple[Any, Any]] = {}
    for i in range(0, len(edges), _IN_CHUNK):
        chunk = edges[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for step, examples, wall in reader.query(
            f"SELECT step, examples, wall_time FROM measurements WHERE step IN ({marks})", chunk
        ):
            x[int(step)] = (examples, wall)
    return _expand(buckets, columns, x, width=w)


def metric_series(
    reader: RunReader, key: str, *, points: int, after: int | None = None, cache: BucketCache | None = None
) -> dict[str, Any]:
    """One metric logged with ``Run.log`` (steps after ``after``), in the same form as ``measurement_series``
    with the single column ``"value"``.  ``examples`` comes from the measurement of the same step when the metric
    row has none."""
    lo = -1 if after is None else after
    rows = reader.query(
        "SELECT m.step, COALESCE(m.examples, (SELECT s.examples FROM measurements s WHERE s.step = m.step)), "
        "m.wall_time, m.value FROM metrics m WHERE m.key = ? AND m.step > ? ORDER BY m.step, m.id LIMIT ?",
        (key, lo, points + 1),
    )
    if len(rows) <= points:
        return _points(rows, ("value",), downsampled=False, width=1, n_rows=len(rows))
    first = int(rows[0][0])
    last = int(reader.query("SELECT max(step) FROM metrics WHERE key = ?", (key,))[0][0])
    w = bucket_width(first, last, max(1, points // 2))
    sql = (
        "SELECT count(*), min(step), max(step), min(value), max(value) FROM metrics "
        "WHERE key = ? AND step >= ? AND step < ?"
    )
    ckey = None if cache is None or after is not None else (file_identity(reader), "metric", key, w)
    known: dict[int, Any] = {}
    top_id = int(reader.query("SELECT coalesce(max(id), 0) FROM metrics")[0][0])
    if cache is not None and ckey is not None:
        known = cache.get(ckey)
        seen = cache.mark(ckey)
        if known and seen is not None:
            # A row logged since for a step inside a kept bucket (a late metric) makes them stale.
            end = (max(known) + 1) * w
            # NOT INDEXED: walk the new rows by id, not every row of the key through the (key, step) index.
            late = reader.query(
                "SELECT 1 FROM metrics NOT INDEXED WHERE id > ? AND key = ? AND step < ? LIMIT 1", (seen, key, end)
            )
            if late:
                cache.drop(ckey)
                known = {}
    complete: dict[int, Any] = {}
    buckets = []
    for k in range(first // w, last // w + 1):
        r = known.get(k)
        if r is None:
            r = reader.query(sql, (key, max(k * w, lo + 1), (k + 1) * w))[0]
            if (k + 1) * w <= last:
                complete[k] = r
        if r[0]:
            buckets.append(r)
    if cache is not None and ckey is not None and (complete or known):
        cache.put(ckey, complete, mark=top_id)
    edges = sorted({int(b[1]) for b in buckets} | {int(b[2]) for b in buckets})
    x: dict[int, tuple[Any, Any]] = {}
    for i in range(0, len(edges), _IN_CHUNK):
        chunk = edges[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for step, examples, wall in reader.query(
            "SELECT m.step, COALESCE(m.examples, (SELECT s.examples FROM measurements s WHERE s.step = m.step)), "
            f"m.wall_time FROM metrics m WHERE m.key = ? AND m.step IN ({marks}) ORDER BY m.id",
            (key, *chunk),
        ):
            x.setdefault(int(step), (examples, wall))  # the first row logged at that step
    return _expand(buckets, ("value",), x, width=w)


def layer_grid(
    reader: RunReader,
    column: str,
    layer_ids: Sequence[int],
    *,
    points: int,
    agg: str = "max",
    cache: BucketCache | None = None,
) -> dict[str, Any]:
    """The per-layer ``column`` of ``layer_ids`` over time, on one grid of step buckets for all of them (complete
    buckets kept in ``cache``).

    Returns:
        ``{"downsampled", "bucket_steps", "step", "step_end", "examples", "wall_time", "values": [[...] per layer]}``:
        column ``j`` covers steps ``step[j]..step_end[j]`` and holds each layer's ``agg`` (``max``, ``min`` or
        ``mean``) over them (``None`` where a layer has no value there).
    """
    if column not in COLUMNS:
        raise ValueError(f"unknown per-layer column {column!r}")
    fn = LAYER_AGGREGATES[agg]
    # Two subqueries: SQLite answers a lone min() or max() of the key from the tree's ends, both together by a scan.
    ends = reader.query("SELECT (SELECT min(step) FROM measurements), (SELECT max(step) FROM measurements)")[0]
    empty: dict[str, Any] = {
        "downsampled": False, "bucket_steps": 1, "step": [], "step_end": [], "examples": [], "wall_time": [],
        "values": [[] for _ in layer_ids],
    }  # fmt: skip
    if ends[0] is None or not layer_ids:
        return empty
    first, last = int(ends[0]), int(ends[1])
    w = bucket_width(first, last, points)
    ident = file_identity(reader) if cache is not None else None
    ekey = (ident, "edges", w)
    known_edges = cache.get(ekey) if cache is not None else {}
    cols: list[tuple[int, int]] = []  # (first step, last step) of each non-empty bucket
    ks: list[int] = []
    complete: dict[int, Any] = {}
    for k in range(first // w, last // w + 1):
        edge = known_edges.get(k)
        if edge is None:
            edge = reader.query(
                "SELECT (SELECT min(step) FROM measurements WHERE step >= ?1 AND step < ?2), "
                "(SELECT max(step) FROM measurements WHERE step >= ?1 AND step < ?2)",
                (k * w, (k + 1) * w),
            )[0]
            if (k + 1) * w <= last:
                complete[k] = edge
        if edge[0] is not None:
            cols.append((int(edge[0]), int(edge[1])))
            ks.append(k)
    if cache is not None and complete:
        cache.put(ekey, complete)
    values: list[list[float | None]] = []
    if w == 1:
        index = {s: j for j, (s, _) in enumerate(cols)}
        for lid in layer_ids:
            row: list[float | None] = [None] * len(cols)
            for step, v in reader.query(
                f"SELECT step, {column} FROM layer_measurements WHERE layer_id = ? ORDER BY step", (lid,)
            ):
                j = index.get(int(step))
                if j is not None:
                    row[j] = v
            values.append(row)
    else:
        sql = f"SELECT {fn}({column}) FROM layer_measurements WHERE layer_id = ? AND step >= ? AND step <= ?"
        for lid in layer_ids:
            lkey = (ident, "layer", lid, column, agg, w)
            known = cache.get(lkey) if cache is not None else {}
            done: dict[int, Any] = {}
            row = []
            for k, (lo, hi) in zip(ks, cols, strict=True):
                if k in known:
                    row.append(known[k])
                    continue
                v = reader.query(sql, (lid, lo, hi))[0][0]
                row.append(v)
                if (k + 1) * w <= last:
                    done[k] = v
            if cache is not None and done:
                cache.put(lkey, done)
            values.append(row)
    x = {int(s): (e, t) for s, e, t in _rows_at(reader, [lo for lo, _ in cols])}
    return {
        "downsampled": w > 1,
        "bucket_steps": w,
        "step": [lo for lo, _ in cols],
        "step_end": [hi for _, hi in cols],
        "examples": [x.get(lo, (None, None))[0] for lo, _ in cols],
        "wall_time": [x.get(lo, (None, None))[1] for lo, _ in cols],
        "values": values,
    }


def _rows_at(reader: RunReader, steps: Sequence[int]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(steps), _IN_CHUNK):
        chunk = list(steps[i : i + _IN_CHUNK])
        marks = ", ".join("?" * len(chunk))
        out += reader.query(f"SELECT step, examples, wall_time FROM measurements WHERE step IN ({marks})", chunk)
    return out


def _points(
    rows: Sequence[Any], columns: Sequence[str], *, downsampled: bool, width: int, n_rows: int
) -> dict[str, Any]:
    return {
        "rows": n_rows,
        "downsampled": downsampled,
        "bucket_steps": width,
        "step": [int(r[0]) for r in rows],
        "examples": [None if r[1] is None else int(r[1]) for r in rows],
        "wall_time": [r[2] for r in rows],
        "values": {c: [r[3 + i] for r in rows] for i, c in enumerate(columns)},
    }


def _expand(
    buckets: Sequence[Any], columns: Sequence[str], x: dict[int, tuple[Any, Any]], *, width: int
) -> dict[str, Any]:
    """Buckets ``(count, first step, last step, min c0, max c0, min c1, ...)`` -> two points each (one if the
    bucket holds a single step)."""
    rows: list[tuple[Any, ...]] = []
    n_rows = 0
    for b in buckets:
        n_rows += int(b[0])
        s0, s1 = int(b[1]), int(b[2])
        mins = tuple(b[3 + 2 * i] for i in range(len(columns)))
        maxs = tuple(b[4 + 2 * i] for i in range(len(columns)))
        e0, t0 = x.get(s0, (None, None))
        rows.append((s0, e0, t0, *mins))
        if s1 != s0 or mins != maxs:
            e1, t1 = x.get(s1, (None, None))
            rows.append((s1, e1, t1, *maxs))
    return _points(rows, columns, downsampled=True, width=width, n_rows=n_rows)
