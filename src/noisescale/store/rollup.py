"""Rollups: each bucket of ``steps`` consecutive steps of a run summed up in one row, kept beside the rows.

A run file of schema version 6 holds three rollup tables, bucket ``k`` covering steps ``k*steps .. (k+1)*steps -
1`` (``steps`` is 64, recorded in the file's ``rollup_state``):

* ``measurement_rollup``: per bucket, its row count, first and last step, and the minimum and maximum of every
  measurement field (``min_b_simple``, ``max_b_simple``, ...);
* ``layer_rollup``: per layer and bucket, the minimum, maximum, sum and count of defined values of the columns in
  ``LAYER_ROLLUP_COLUMNS`` (``b_simple``, the heat map's);
* ``metric_rollup``: per metric key and bucket, its row count, first and last step, minimum and maximum value.

The writer (``Run``) brings them up to date in every transaction it commits, so a reader always sees rollups
that count exactly the rows it sees: a chart of a million steps is drawn from sixteen thousand buckets, not a
million rows.  ``refresh_rollups`` merges what was written since its last call (rows with a later step, metric
rows with a later id) and recomputes from their rows the buckets of steps written again (``INSERT OR REPLACE``
of a step already counted).  ``rollup_state`` records how far the rollups go; ``rollup_for`` compares that with the
rows a reader sees and answers ``None`` when they do not count them all (a file of schema 4, rows written without
``refresh_rollups``): the reader then aggregates the rows themselves.

Rows at a negative step are never rolled up (a reader aggregates their buckets from the rows); layer rows are
expected in the same transaction as their step's measurement, as ``Run`` writes them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from noisescale.store.schema import LAYER_ROLLUP_COLUMNS, MEASUREMENT_FIELDS, MIGRATIONS

__all__ = ["LAYER_ROLLUP_COLUMNS", "ROLLUP_VERSION", "Rollup", "rebuild_rollups", "refresh_rollups", "rollup_for"]

ROLLUP_VERSION = next(m.version for m in MIGRATIONS if m.name == "create_rollups")
"""The schema version that added the rollup tables."""


class _Queryable(Protocol):
    schema_version: int

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...


@dataclass(frozen=True)
class Rollup:
    """What a reader may take from a file's rollups.

    Attributes:
        steps: steps per bucket (a power of two).
        through_step: measurement and layer rows up to this step are counted.
    """

    steps: int
    through_step: int


def rollup_for(reader: _Queryable) -> Rollup | None:
    """The file's rollups if they count every measurement and metric row ``reader`` sees, else ``None``.

    Call it inside ``reader.snapshot()``, with the queries that use it.
    """
    if reader.schema_version < ROLLUP_VERSION:
        return None
    rows = reader.query(
        "SELECT steps, through_step, through_metric, (SELECT max(step) FROM measurements), "
        "(SELECT coalesce(max(id), 0) FROM metrics) FROM rollup_state"
    )
    if not rows:
        return None
    steps, through_step, through_metric, last_step, last_metric = rows[0]
    counted = max(-1, -1 if last_step is None else int(last_step))
    if int(through_step) != counted or int(through_metric) != int(last_metric):
        return None
    steps = int(steps)
    if steps < 1 or steps & (steps - 1):
        return None
    return Rollup(steps=steps, through_step=int(through_step))


def refresh_rollups(conn: sqlite3.Connection, *, steps: Iterable[int] = ()) -> None:
    """Count in the rollups the rows written since the last refresh, inside the caller's transaction.

    Args:
        conn: a writable connection to a run file of schema version 6 or later, in a transaction.
        steps: the measurement steps written since the last refresh; those at or before a step already counted
            (a step written again replaces its row) have their buckets recomputed from the rows.
    """
    w, through_step, through_metric = conn.execute(
        "SELECT steps, through_step, through_metric FROM rollup_state"
    ).fetchone()
    w, through_step, through_metric = int(w), int(through_step), int(through_metric)
    again = sorted({int(s) // w for s in steps if 0 <= int(s) <= through_step})
    # One bucket at a time, from the first new step to the last (a seek from one non-empty bucket to the next, so
    # a gap of many steps costs nothing): a range of the primary key each, aggregated as the rows come, where one
    # GROUP BY over all of them would sort them first.
    start = through_step + 1
    while True:
        first = conn.execute("SELECT min(step) FROM measurements WHERE step >= ?", (start,)).fetchone()[0]
        if first is None:
            break
        k = int(first) // w
        span = (k, max(k * w, start), (k + 1) * w)
        conn.execute(_MERGE_MEASUREMENTS, span)
        conn.execute(_MERGE_LAYERS, span)
        start = (k + 1) * w
    conn.execute(_MERGE_METRICS.format(w=w), (through_metric,))
    for k in again:
        _recompute(conn, w, k)
    conn.execute(
        "UPDATE rollup_state SET through_step = max(through_step, (SELECT coalesce(max(step), -1) FROM measurements)), "
        "through_metric = (SELECT coalesce(max(id), 0) FROM metrics)"
    )


def rebuild_rollups(conn: sqlite3.Connection) -> None:
    """Recompute every rollup from the rows (after rows were written without ``refresh_rollups``), inside the
    caller's transaction."""
    conn.execute("DELETE FROM measurement_rollup")
    conn.execute("DELETE FROM layer_rollup")
    conn.execute("DELETE FROM metric_rollup")
    conn.execute("UPDATE rollup_state SET through_step = -1, through_metric = 0")
    refresh_rollups(conn)


def _recompute(conn: sqlite3.Connection, w: int, k: int) -> None:
    """Bucket ``k`` of measurements and layers again from its rows (metric rows are never rewritten)."""
    conn.execute("DELETE FROM measurement_rollup WHERE bucket = ?", (k,))
    conn.execute("DELETE FROM layer_rollup WHERE layer_id IN (SELECT id FROM layers) AND bucket = ?", (k,))
    span = (k, k * w, (k + 1) * w)
    conn.execute(_MERGE_MEASUREMENTS, span)
    conn.execute(_MERGE_LAYERS, span)


def _least(a: str, b: str) -> str:
    # SQLite's two-argument min() is NULL if either is: the extremes ignore undefined values, as min() over rows.
    return f"coalesce(min({a}, {b}), {a}, {b})"


def _greatest(a: str, b: str) -> str:
    return f"coalesce(max({a}, {b}), {a}, {b})"


# Parameters: the bucket, then its steps [lo, hi) to count.  An aggregate without GROUP BY gives one row even over
# no rows: the outer WHERE keeps an empty range out (HAVING without GROUP BY needs SQLite 3.39).
_MERGE_MEASUREMENTS = (
    "INSERT INTO measurement_rollup SELECT * FROM (SELECT ?1, count(*) AS n, min(step), max(step), "
    + ", ".join(f"min({f}), max({f})" for f in MEASUREMENT_FIELDS)
    + " FROM measurements WHERE step >= ?2 AND step < ?3) WHERE n > 0 ON CONFLICT (bucket) DO UPDATE SET "
    + "rows = rows + excluded.rows, first_step = min(first_step, excluded.first_step), "
    + "last_step = max(last_step, excluded.last_step), "
    + ", ".join(
        f"min_{f} = {_least('min_' + f, 'excluded.min_' + f)}, max_{f} = {_greatest('max_' + f, 'excluded.max_' + f)}"
        for f in MEASUREMENT_FIELDS
    )
)
# `layer_id IN (...)`: one range of the primary key per layer, in layer order, so GROUP BY layer_id needs no sort.
_MERGE_LAYERS = (
    "INSERT INTO layer_rollup SELECT layer_id, ?1, "
    + ", ".join(f"min({c}), max({c}), sum({c}), count({c})" for c in LAYER_ROLLUP_COLUMNS)
    + " FROM layer_measurements WHERE layer_id IN (SELECT id FROM layers) AND step >= ?2 AND step < ?3 "
    + "GROUP BY layer_id ON CONFLICT (layer_id, bucket) DO UPDATE SET "
    + ", ".join(
        f"min_{c} = {_least('min_' + c, 'excluded.min_' + c)}, max_{c} = {_greatest('max_' + c, 'excluded.max_' + c)}, "
        f"sum_{c} = coalesce(sum_{c} + excluded.sum_{c}, sum_{c}, excluded.sum_{c}), n_{c} = n_{c} + excluded.n_{c}"
        for c in LAYER_ROLLUP_COLUMNS
    )
)
# Metric rows since the last refresh, by id (a late one lands in an old bucket); the bucket width `{w}` is put in
# as a literal integer, read from the file.  NOT INDEXED: the new rows by id, not every row through (key, step).
_MERGE_METRICS = (
    "INSERT INTO metric_rollup SELECT key, step / {w}, count(*), min(step), max(step), min(value), max(value) "
    "FROM metrics NOT INDEXED WHERE id > ? AND step >= 0 GROUP BY key, step / {w} "
    "ON CONFLICT (key, bucket) DO UPDATE SET "
    "rows = rows + excluded.rows, first_step = min(first_step, excluded.first_step), "
    "last_step = max(last_step, excluded.last_step), "
    f"min_value = {_least('min_value', 'excluded.min_value')}, "
    f"max_value = {_greatest('max_value', 'excluded.max_value')}"
)
