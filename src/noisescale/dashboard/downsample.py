"""Series read from a run file, cut down on the server to what a chart can show, with every extreme kept.

A series of at most ``points`` rows is returned as stored.  A longer one is cut into buckets of ``w`` consecutive
steps (``w`` the smallest power of two giving at most ``points / 2`` buckets, aligned on multiples of ``w`` so a
growing run keeps its bucket edges); each bucket gives two points: its first step with the minimum of each column
over the bucket, and its last step with the maximum.  So the chart's envelope is exact: no spike is lost, and no
value is made up (every value shown is one that was recorded).  Inside a bucket the order of the minimum and the
maximum is not kept; a bucket is about two pixels wide at the default ``points``.

A file that keeps rollups (schema 6: every bucket of 64 steps summed up by the writer, see
``noisescale.store.rollup``) gives each bucket of ``w >= 64`` steps from its ``w / 64`` rollup rows, exactly what
the rows give (the minimum of minima is the minimum): a run of a million steps is read from sixteen thousand rows.
The heat map's rollups hold the per-layer ``b_simple`` only; another column is read from the rows.
Otherwise (an older file, a bucket cut by ``after``) each bucket is one SQL aggregate over a step range of the
primary key (no sort, no Python loop over rows), about a second per million rows.  Call these inside
``reader.snapshot()`` so all the queries of one answer see the same state of a file that is still being written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from noisescale.dashboard.buckets import BucketCache, file_identity
from noisescale.store.reader import MEASUREMENT_FIELDS, RunReader
from noisescale.store.rollup import LAYER_ROLLUP_COLUMNS, Rollup, rollup_for
from noisescale.types import COLUMNS

__all__ = ["LAYER_AGGREGATES", "bucket_width", "layer_grid", "measurement_series", "metric_series"]

LAYER_AGGREGATES = {"max": "max", "min": "min", "mean": "avg"}
# The same over a bucket's layer rollup rows (a mean is the sum of the values over their count).
_LAYER_ROLLUP_AGGREGATES = {"max": "max(max_{c})", "min": "min(min_{c})", "mean": "sum(sum_{c}) * 1.0 / sum(n_{c})"}
_IN_CHUNK = 400  # steps per `IN (...)` list (well under SQLite's variable limit)


def bucket_width(first: int, last: int, points: int) -> int:
    """The smallest power of two ``w`` such that steps ``first..last`` fall in at most ``points`` buckets
    ``[k*w, (k+1)*w)``; steps on both sides of 0 (a metric logged at a negative step) take two buckets at least.

    >>> bucket_width(1, 1000, 1000), bucket_width(0, 999, 500), bucket_width(0, 1_000_000, 1000), bucket_width(-5, 9, 1)
    (1, 2, 1024, 16)
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    w = 1
    # Past max(|first|, |last|) the steps lie in buckets -1 and 0: a wider bucket changes nothing.
    while last // w - first // w + 1 > points and w <= max(abs(first), abs(last)):
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
    rolled_aggs = "".join(f", min(min_{c}), max(max_{c})" for c in columns)
    rolled_sql = (
        f"SELECT bucket / {{r}}, sum(rows), min(first_step), max(last_step){rolled_aggs} FROM measurement_rollup "
        "WHERE bucket >= ? AND bucket < ? GROUP BY bucket / {r}"
    )
    key = None if cache is None or after is not None else (file_identity(reader), "measurements", tuple(columns), w)
    known = cache.get(key) if cache is not None and key is not None else {}
    todo = [k for k in range(first // w, last // w + 1) if k not in known]
    rolled = _from_rollup(reader, rolled_sql, (), todo, w=w, lo=lo, empty=(0,) + (None,) * (2 + 2 * len(columns)))
    complete: dict[int, Any] = {}
    buckets = []
    for k in range(first // w, last // w + 1):
        r = known.get(k)
        if r is None:
            r = rolled[k] if k in rolled else reader.query(sql, (max(k * w, lo + 1), (k + 1) * w))[0]
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
    rolled_sql = (
        "SELECT bucket / {r}, sum(rows), min(first_step), max(last_step), min(min_value), max(max_value) "
        "FROM metric_rollup WHERE key = ? AND bucket >= ? AND bucket < ? GROUP BY bucket / {r}"
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
    todo = [k for k in range(first // w, last // w + 1) if k not in known]
    rolled = _from_rollup(reader, rolled_sql, (key,), todo, w=w, lo=lo, empty=(0, None, None, None, None))
    complete: dict[int, Any] = {}
    buckets = []
    for k in range(first // w, last // w + 1):
        r = known.get(k)
        if r is None:
            r = rolled[k] if k in rolled else reader.query(sql, (key, max(k * w, lo + 1), (k + 1) * w))[0]
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
    roll = rollup_for(reader) if w > 1 else None
    edge_sql = (
        "SELECT bucket / {r}, min(first_step), max(last_step) FROM measurement_rollup "
        "WHERE bucket >= ? AND bucket < ? GROUP BY bucket / {r}"
    )
    todo = [k for k in range(first // w, last // w + 1) if k not in known_edges]
    rolled_edges = _from_rollup(reader, edge_sql, (), todo, w=w, lo=-1, empty=(None, None), rollup=roll) if roll else {}
    cols: list[tuple[int, int]] = []  # (first step, last step) of each non-empty bucket
    ks: list[int] = []
    complete: dict[int, Any] = {}
    for k in range(first // w, last // w + 1):
        edge = known_edges.get(k)
        if edge is None and k in rolled_edges:
            edge = rolled_edges[k]
            if (k + 1) * w <= last:
                complete[k] = edge
        elif edge is None:
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
        rolled_sql = (
            f"SELECT bucket / {{r}}, {_LAYER_ROLLUP_AGGREGATES[agg].format(c=column)} FROM layer_rollup "
            "WHERE layer_id = ? AND bucket >= ? AND bucket < ? GROUP BY bucket / {r}"
        )
        layer_roll = _layer_rollup(reader, roll, column, layer_ids)
        for lid in layer_ids:
            lkey = (ident, "layer", lid, column, agg, w)
            known = cache.get(lkey) if cache is not None else {}
            todo = [k for k in ks if k not in known]
            rolled = (
                _from_rollup(reader, rolled_sql, (lid,), todo, w=w, lo=-1, empty=(None,), rollup=layer_roll)
                if layer_roll
                else {}
            )
            done: dict[int, Any] = {}
            row = []
            for k, (lo, hi) in zip(ks, cols, strict=True):
                if k in known:
                    row.append(known[k])
                    continue
                v = rolled[k][0] if k in rolled else reader.query(sql, (lid, lo, hi))[0][0]
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


def _from_rollup(
    reader: RunReader,
    sql: str,
    params: tuple[Any, ...],
    ks: Sequence[int],
    *,
    w: int,
    lo: int,
    empty: tuple[Any, ...],
    rollup: Rollup | None = None,
) -> dict[int, tuple[Any, ...]]:
    """The buckets of ``ks`` (of ``w`` steps) that the file's rollups give: those of at least the rollup's width,
    at steps >= 0, wholly after step ``lo``; each a tuple of values (``empty`` for a bucket without rows).

    ``sql`` groups the rollup rows by ``bucket / {r}`` (``r`` rollup buckets in one of ``w`` steps), its last two
    parameters the range of rollup buckets; the ones before are ``params``.
    """
    rollup = rollup if rollup is not None else rollup_for(reader) if ks and w > 1 else None
    if rollup is None or w < rollup.steps:
        return {}
    wanted = [k for k in ks if k >= 0 and k * w > lo]
    if not wanted:
        return {}
    r = w // rollup.steps
    got = {
        int(row[0]): tuple(row[1:])
        for row in reader.query(sql.format(r=r), (*params, wanted[0] * r, (wanted[-1] + 1) * r))
    }
    return {k: got.get(k, empty) for k in wanted}


def _layer_rollup(reader: RunReader, rollup: Rollup | None, column: str, layer_ids: Sequence[int]) -> Rollup | None:
    """``rollup`` if it sums up ``column`` and holds every row of these layers (rows written with their step's
    measurement, as ``Run`` writes them)."""
    if rollup is None or column not in LAYER_ROLLUP_COLUMNS:
        return None
    for lid in layer_ids:
        top = reader.query("SELECT max(step) FROM layer_measurements WHERE layer_id = ?", (lid,))[0][0]
        if top is not None and int(top) > rollup.through_step:
            return None
    return rollup


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
