"""The run file's schema, as ordered, named migrations recorded in the file itself.

Each migration runs in its own transaction together with the row that records it in ``schema_migrations``, so a
file is always at a well-defined version.  A new schema change is a new entry at the end of ``MIGRATIONS``;
entries are never edited or reordered once released.  Readers accept files up to ``SCHEMA_VERSION`` and refuse
newer ones with a message naming both versions (they never migrate: a reader does not write).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from noisescale.columns import COLUMNS
from noisescale.store.errors import StoreError

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "Migration", "apply_migrations", "read_schema_version"]

APPLICATION_ID = 0x4E53474E  # "NSGN" in the SQLite header: marks the file as a noisescale run
_VALUES = ", ".join(f"{c} REAL" for c in COLUMNS)


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
)
SCHEMA_VERSION = MIGRATIONS[-1].version


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
