"""The run file's schema, as ordered, named migrations recorded in the file itself.

Each migration runs in its own transaction together with the row that records it in ``schema_migrations``, so a
file is always at a well-defined version.  A new schema change is a new entry at the end of ``MIGRATIONS``;
entries are never edited or reordered once released.  Readers accept files up to ``SCHEMA_VERSION`` and refuse
newer ones with a message naming both versions (they never migrate: a reader does not write).  Files of an
older version down to ``FIRST_RELEASED_VERSION`` stay readable: the tables a later migration adds read as empty (the
groups of version 5), or are used when the file has them (the rollups of version 6).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from noisescale.columns import COLUMNS
from noisescale.group_types import GROUP_FIELDS
from noisescale.store.errors import StoreError

__all__ = [
    "APPLICATION_ID",
    "FIRST_RELEASED_VERSION",
    "LAYER_ROLLUP_COLUMNS",
    "MEASUREMENT_FIELDS",
    "MIGRATIONS",
    "ROLLUP_STEPS",
    "SCHEMA_VERSION",
    "Migration",
    "apply_migrations",
    "read_schema_version",
]

APPLICATION_ID = 0x4E53474E  # "NSGN" in the SQLite header: marks the file as a noisescale run
MEASUREMENT_FIELDS = ("batch_size", "coverage", "skipped_steps", *COLUMNS)
"""Numeric columns of the monitor's measurements (``RunReader.series`` reads them, the rollups keep their extremes)."""
ROLLUP_STEPS = 64
"""Steps per rollup bucket in a new file (the file records its own in ``rollup_state``)."""
LAYER_ROLLUP_COLUMNS = ("b_simple",)
"""The per-layer columns the rollups sum up (the dashboard's heat map): per-layer rows are most of what is written,
and every column rolled up costs the writer time at each of them."""
_VALUES = ", ".join(f"{c} REAL" for c in COLUMNS)
_GROUP_VALUES = ", ".join(f"{c} REAL" for c in GROUP_FIELDS)
# Rollup columns have no declared type: a value keeps its own (an integer batch size stays an integer).
_MEASUREMENT_EXTREMES = ", ".join(f"min_{f}, max_{f}" for f in MEASUREMENT_FIELDS)
_LAYER_AGGREGATES = ", ".join(f"min_{c}, max_{c}, sum_{c}, n_{c} INTEGER NOT NULL" for c in LAYER_ROLLUP_COLUMNS)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "create_run",
        """
        CREATE TABLE run (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            started_at REAL NOT NULL,   -- unix time
            updated_at REAL NOT NULL,   -- last commit by the writer (a stale 'running' run was killed)
            ended_at REAL,
            status TEXT NOT NULL,       -- running | finished | failed | interrupted
            config TEXT NOT NULL,       -- JSON object
            noisescale_version TEXT NOT NULL,
            host TEXT,
            pid INTEGER
        );
        """,
    ),
    Migration(
        2,
        "create_measurements",
        f"""
        CREATE TABLE measurements (
            step INTEGER PRIMARY KEY,
            examples INTEGER NOT NULL,
            wall_time REAL NOT NULL,
            batch_size INTEGER NOT NULL,
            source TEXT NOT NULL,
            coverage REAL,
            status TEXT NOT NULL,
            skipped_steps INTEGER NOT NULL,
            {_VALUES}
        );
        """,
    ),
    Migration(
        3,
        "create_layers",
        f"""
        CREATE TABLE layers (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,         -- param | module
            name TEXT NOT NULL,
            UNIQUE (kind, name)
        );
        CREATE TABLE layer_measurements (
            layer_id INTEGER NOT NULL REFERENCES layers (id),
            step INTEGER NOT NULL,
            {_VALUES},
            PRIMARY KEY (layer_id, step)
        ) WITHOUT ROWID;
        """,
    ),
    Migration(
        4,
        "create_metrics_and_events",
        """
        CREATE TABLE metrics (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL,
            step INTEGER NOT NULL,
            examples INTEGER,
            wall_time REAL NOT NULL,
            value REAL
        );
        CREATE INDEX metrics_key_step ON metrics (key, step);
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            step INTEGER,
            examples INTEGER,
            wall_time REAL NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT                   -- JSON or NULL
        );
        """,
    ),
    Migration(
        5,
        "create_groups_and_example_scores",
        f"""
        CREATE TABLE group_measurements (
            group_id INTEGER NOT NULL,  -- the id passed in monitor.step(groups=...)
            step INTEGER NOT NULL,
            examples INTEGER NOT NULL,  -- the group's examples in that step
            {_GROUP_VALUES},
            PRIMARY KEY (group_id, step)
        ) WITHOUT ROWID;
        CREATE TABLE example_scores (
            step INTEGER NOT NULL,
            example INTEGER NOT NULL,   -- the id passed in monitor.step(example_ids=...)
            group_id INTEGER,
            score REAL NOT NULL         -- the example's squared gradient norm
        );
        CREATE INDEX example_scores_step ON example_scores (step);
        """,
    ),
    Migration(
        6,
        "create_rollups",
        f"""
        CREATE TABLE rollup_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            steps INTEGER NOT NULL,          -- bucket k holds steps k*steps .. (k+1)*steps - 1
            through_step INTEGER NOT NULL,   -- measurement and layer rows up to this step are counted
            through_metric INTEGER NOT NULL  -- metric rows up to this id are counted
        );
        INSERT INTO rollup_state VALUES (1, {ROLLUP_STEPS}, -1, 0);
        CREATE TABLE measurement_rollup (
            bucket INTEGER PRIMARY KEY,
            rows INTEGER NOT NULL,
            first_step INTEGER NOT NULL,
            last_step INTEGER NOT NULL,
            {_MEASUREMENT_EXTREMES}
        );
        CREATE TABLE layer_rollup (
            layer_id INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            {_LAYER_AGGREGATES},
            PRIMARY KEY (layer_id, bucket)
        ) WITHOUT ROWID;
        CREATE TABLE metric_rollup (
            key TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            first_step INTEGER NOT NULL,
            last_step INTEGER NOT NULL,
            min_value,
            max_value,
            PRIMARY KEY (key, bucket)
        ) WITHOUT ROWID;
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
FIRST_RELEASED_VERSION = 4
"""The oldest schema a reader accepts, the one noisescale 0.1.0 writes (a file below it was never completed)."""


def apply_migrations(conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring a writable connection's file up to the last of ``migrations``; returns the version reached.

    ``conn`` must be in autocommit mode (``isolation_level=None``): each migration is one explicit transaction.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    current = read_schema_version(conn)
    latest = migrations[-1].version
    if current > latest:
        raise StoreError(f"the run file has schema version {current}, newer than this noisescale's {latest}")
    for mig in migrations:
        if mig.version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(mig.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (mig.version, mig.name, time.time()),
            )
            conn.execute(f"PRAGMA user_version = {int(mig.version)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    return latest


def read_schema_version(conn: sqlite3.Connection) -> int:
    """The highest migration recorded in the file (0 for a file without a migrations table)."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not has_table:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _statements(sql: str) -> list[str]:
    # The migration scripts hold no ';' inside literals, so a split is enough (executescript would COMMIT).
    return [s.strip() for s in sql.split(";") if s.strip()]
