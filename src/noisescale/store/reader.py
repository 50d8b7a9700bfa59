"""Reading a run file: read-only, safe on damaged or foreign files, live while the run is still written.

The file is opened with SQLite's ``mode=ro``: a reader never writes to it, never migrates it, never deletes it.
Each query sees every transaction the writer has committed so far; ``with reader.snapshot():`` makes several
queries see one consistent state.  Every problem with the file (missing, empty, not SQLite, not a noisescale
run, truncated, from a newer noisescale) is a one-line ``StoreError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import struct
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from noisescale.columns import COLUMNS
from noisescale.store.errors import StoreError
from noisescale.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, read_schema_version

__all__ = ["MEASUREMENT_FIELDS", "LayerMatrix", "RunInfo", "RunReader", "Series", "open_run_file"]

MEASUREMENT_FIELDS = ("batch_size", "coverage", "skipped_steps", *COLUMNS)
"""Numeric columns of the monitor's measurements that ``RunReader.series`` returns."""
SERIES_COLUMNS = ("step", "examples", "wall_time", "value")
"""The columns of ``Series.to_table()``."""
_SQLITE_MAGIC = b"SQLite format 3\x00"
LayerKind = Literal["param", "module"]


@dataclass(frozen=True)
class RunInfo:
    """What a run file says about its run (``status`` is ``running`` until the writer closes it)."""

    id: str
    name: str
    path: Path
    status: str
    started_at: float
    updated_at: float
    ended_at: float | None
    config: dict[str, Any]
    noisescale_version: str
    host: str | None
    pid: int | None
    schema_version: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "path": str(self.path),
            "status": self.status,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "ended_at": self.ended_at,
            "config": self.config,
            "noisescale_version": self.noisescale_version,
            "host": self.host,
            "pid": self.pid,
            "schema_version": self.schema_version,
        }


@dataclass(frozen=True)
class Series:
    """One value over time, as plain lists of equal length (``None`` where undefined).

    Attributes:
        name: the column or metric.
        step: optimizer steps; examples: examples seen (``None`` where unknown); wall_time: unix seconds.
        value: the values (``inf`` kept for an unbounded band edge).
    """

    name: str
    step: list[int] = field(default_factory=list)
    examples: list[int | None] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    def to_numpy(self) -> Any:
        """The values as a float64 array of shape ``(n,)`` (NaN for ``None``; ``inf`` kept).

        Imports NumPy (``pip install numpy``); ``to_table()`` gives steps, examples and times beside them.
        """
        np = _numpy()
        return np.array([float("nan") if v is None else v for v in self.value], dtype=np.float64)

    def to_table(self) -> Any:
        """A float64 array of shape ``(n, 4)``: columns ``step, examples, wall_time, value`` (NaN for ``None``),
        as named in ``SERIES_COLUMNS``.

        Imports NumPy (``pip install numpy``).
        """
        np = _numpy()
        nan = float("nan")
        cols: tuple[list[Any], ...] = (self.step, self.examples, self.wall_time, self.value)
        out = np.empty((len(self.step), len(cols)), dtype=np.float64)
        for j, col in enumerate(cols):
            out[:, j] = [nan if v is None else v for v in col]
        return out


@dataclass(frozen=True)
class LayerMatrix:
    """Per-layer values over time: ``values[i][j]`` is layer ``names[i]`` at ``step[j]``."""

    column: str
    kind: str
    names: list[str]
    step: list[int]
    examples: list[int]
    values: list[list[float | None]]

    def to_numpy(self) -> Any:
        """``values`` as a float64 array of shape ``(layers, steps)`` (NaN for ``None``)."""
        np = _numpy()
        return np.array([[float("nan") if v is None else v for v in row] for row in self.values], dtype=np.float64)


class RunReader:
    """Read-only view of one run file.  Prefer ``open_run`` (which also finds runs by id or name)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        wal_mode = _precheck(self.path)
        self._depth = 0
        # A WAL-mode file with no log beside it has no writer (a writer keeps its log until it closes, and runs
        # are never reopened for writing): open it immutable, so not even an empty -wal/-shm is created beside it.
        # Otherwise read-only, seeing each new commit of a live writer.
        immutable = wal_mode and not Path(f"{self.path}-wal").exists()
        try:
            uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + ("?immutable=1" if immutable else "?mode=ro")
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {_show(self.path)}: {e}") from None
        try:
            self._conn.execute("PRAGMA busy_timeout = 10000")
            self.schema_version = self._check_schema()
            self._info_row()  # a damaged run table fails here, not later
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RunReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[RunReader]:
        """Make every query inside the ``with`` block see the same committed state of the file."""
        if self._depth == 0:
            self._query("BEGIN")
            self._query("SELECT 1 FROM run LIMIT 1")  # start the read transaction now
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("COMMIT")

    # -- run ---------------------------------------------------------------------------------------------------

    @property
    def info(self) -> RunInfo:
        """The run's id, name, status, times and config (read afresh each time)."""
        row = self._info_row()
        try:
            config = json.loads(row[6]) if row[6] else {}
        except ValueError:
            config = {"_unreadable_config": row[6]}
        return RunInfo(
            id=str(row[0]),
            name=str(row[1]),
            path=self.path,
            status=str(row[5]),
            started_at=float(row[2]),
            updated_at=float(row[3]),
            ended_at=None if row[4] is None else float(row[4]),
            config=config if isinstance(config, dict) else {"config": config},
            noisescale_version=str(row[7]),
            host=row[8],
            pid=row[9],
            schema_version=self.schema_version,
        )

    # -- monitor measurements ----------------------------------------------------------------------------------

    def num_steps(self) -> int:
        """Measurements recorded so far."""
        return int(self._query("SELECT count(*) FROM measurements")[0][0])

    def measurements(self) -> list[dict[str, Any]]:
        """Every measurement as a dict (``step, examples, wall_time, batch_size, source, coverage, status,
        skipped_steps`` and the ``COLUMNS`` of ``noisescale.types``), in step order."""
        names = ("step", "examples", "wall_time", "batch_size", "source", "coverage", "status", "skipped_steps")
        rows = self._query(f"SELECT {', '.join(names + COLUMNS)} FROM measurements ORDER BY step")
        return [dict(zip(names + COLUMNS, r, strict=True)) for r in rows]

    def series(self, column: str) -> Series:
        """A whole-model measurement column over time, e.g. ``series("b_simple")``; see ``MEASUREMENT_FIELDS``."""
        if column not in MEASUREMENT_FIELDS:
            raise StoreError(f"unknown measurement column {column!r}; expected one of {list(MEASUREMENT_FIELDS)}")
        rows = self._query(f"SELECT step, examples, wall_time, {column} FROM measurements ORDER BY step")
        return _series(column, rows)

    # -- user metrics and events -------------------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT key FROM metrics ORDER BY key")]

    def metric(self, key: str) -> Series:
        """A metric logged with ``run.log``, e.g. ``metric("loss")`` (empty if never logged)."""
        rows = self._query(
            "SELECT m.step, COALESCE(m.examples, s.examples), m.wall_time, m.value FROM metrics m "
            "LEFT JOIN measurements s ON s.step = m.step WHERE m.key = ? ORDER BY m.step, m.id",
            (key,),
        )
        return _series(key, rows)

    def events(self) -> list[dict[str, Any]]:
        # An event may be written before its step's measurement (they travel on different threads): the
        # measurement's examples fill in.
        rows = self._query(
            "SELECT e.step, COALESCE(e.examples, s.examples), e.wall_time, e.kind, e.message, e.data FROM events e "
            "LEFT JOIN measurements s ON s.step = e.step ORDER BY e.id"
        )
        out = []
        for step, examples, wall, kind, message, data in rows:
            try:
                parsed = json.loads(data) if data is not None else None
            except ValueError:
                parsed = data
            out.append(
                {
                    "step": step,
                    "examples": examples,
                    "wall_time": wall,
                    "kind": kind,
                    "message": message,
                    "data": parsed,
                }
            )
        return out

    # -- per layer ---------------------------------------------------------------------------------------------

    def layer_names(self, kind: LayerKind = "param") -> list[str]:
        """Parameter tensors (``"param"``, e.g. ``"0.weight"``) or modules (``"module"``) with recorded values."""
        return [r[0] for r in self._query("SELECT name FROM layers WHERE kind = ? ORDER BY id", (kind,))]

    def latest_layers(self, kind: LayerKind = "param") -> dict[str, dict[str, float | None]]:
        """Each parameter tensor's (or module's) ``COLUMNS`` at the last step it was measured."""
        rows = self._query(
            f"SELECT n.name, {', '.join('l.' + c for c in COLUMNS)} FROM layer_measurements l "
            "JOIN layers n ON n.id = l.layer_id WHERE n.kind = ? AND l.step = "
            "(SELECT max(step) FROM layer_measurements m WHERE m.layer_id = l.layer_id) ORDER BY n.id",
            (kind,),
        )
        return {r[0]: dict(zip(COLUMNS, r[1:], strict=True)) for r in rows}

    def layer_series(self, name: str, column: str = "b_simple", *, kind: LayerKind = "param") -> Series:
        """One parameter tensor's (or module's) ``column`` over time."""
        _check_column(column)
        rows = self._query(
            f"SELECT l.step, s.examples, s.wall_time, l.{column} FROM layer_measurements l "
            "JOIN layers n ON n.id = l.layer_id JOIN measurements s ON s.step = l.step "
            "WHERE n.kind = ? AND n.name = ? ORDER BY l.step",
            (kind, name),
        )
        return _series(name, rows)

    def layer_matrix(
        self, column: str = "b_simple", *, kind: LayerKind = "param", max_steps: int | None = None
    ) -> LayerMatrix:
        """Every layer's ``column`` at every step (or at most ``max_steps`` evenly spaced steps), read at once."""
        _check_column(column)
        with self.snapshot():
            names = self.layer_names(kind)
            steps_rows = self._query("SELECT step, examples FROM measurements ORDER BY step")
            if max_steps is not None and len(steps_rows) > max_steps > 0:
                stride = -(-len(steps_rows) // max_steps)
                steps_rows = steps_rows[::stride]
            col_of = {int(s): j for j, (s, _) in enumerate(steps_rows)}
            row_of = {n: i for i, n in enumerate(names)}
            values: list[list[float | None]] = [[None] * len(steps_rows) for _ in names]
            rows = self._query(
                f"SELECT n.name, l.step, l.{column} FROM layer_measurements l JOIN layers n ON n.id = l.layer_id "
                "WHERE n.kind = ?",
                (kind,),
            )
        for name, step, v in rows:
            j = col_of.get(int(step))
            if j is not None:
                values[row_of[name]][j] = v
        return LayerMatrix(
            column=column,
            kind=kind,
            names=names,
            step=[int(s) for s, _ in steps_rows],
            examples=[int(e) for _, e in steps_rows],
            values=values,
        )

    # -- raw SQL -----------------------------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one SQL statement on the file, for readers that need an aggregate the methods above do not
        offer (the dashboard's downsampling).  The connection is read-only: a statement that writes fails."""
        return self._query(sql, params)

    # -- internals ---------------------------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._conn is None:
            raise StoreError(f"the reader of {_show(self.path)} was closed")
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read {_show(self.path)}: {_describe(e)}") from None

    def _info_row(self) -> Any:
        rows = self._query(
            "SELECT id, name, started_at, updated_at, ended_at, status, config, noisescale_version, host, pid "
            "FROM run LIMIT 1"
        )
        if not rows:
            raise StoreError(f"{_show(self.path)} holds no run record: its creation was interrupted")
        return rows[0]

    def _check_schema(self) -> int:
        assert self._conn is not None
        try:
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            version = read_schema_version(self._conn)
            names = (
                dict(self._conn.execute("SELECT version, name FROM schema_migrations").fetchall()) if version else {}
            )
        except sqlite3.Error as e:
            raise StoreError(f"{_show(self.path)} is not a readable noisescale run: {_describe(e)}") from None
        if version == 0 or app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{_show(self.path)} is an SQLite database but not a noisescale run")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{_show(self.path)} was written by a newer noisescale (schema version {version}; this version reads "
                f"up to {SCHEMA_VERSION}): upgrade noisescale to read it"
            )
        for mig in MIGRATIONS:
            if mig.version <= version and names.get(mig.version) != mig.name:
                raise StoreError(
                    f"{_show(self.path)} has an unknown schema history (migration {mig.version} is "
                    f"{names.get(mig.version)!r}, expected {mig.name!r}): it was not written by this noisescale"
                )
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{_show(self.path)} has an incomplete schema (version {version} of {SCHEMA_VERSION}): its creation "
                "was interrupted"
            )
        return version


def open_run_file(path: str | os.PathLike[str]) -> RunReader:
    """Open one run file read-only (``StoreError`` with a one-line reason if it cannot be read)."""
    return RunReader(path)


def _precheck(path: Path) -> bool:
    """Cheap checks that give a precise message before SQLite gives a vague one; returns whether the file is in
    WAL mode."""
    if not path.exists():
        raise StoreError(f"no run file at {_show(path)}")
    if path.is_dir():
        raise StoreError(f"{_show(path)} is a folder, not a run file (list its runs with `noisescale runs {path}`)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise StoreError(f"cannot read {_show(path)}: {e.strerror or e}") from None
    if size == 0:
        raise StoreError(f"{_show(path)} is empty (0 bytes): not a noisescale run file")
    if not header.startswith(_SQLITE_MAGIC):
        raise StoreError(f"{_show(path)} is not a noisescale run file (not an SQLite database)")
    if len(header) < 100:
        raise StoreError(f"{_show(path)} is damaged: truncated to {size} bytes")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change, pages, valid_for = (
        struct.unpack(">I", header[24:28])[0],
        struct.unpack(">I", header[28:32])[0],
        struct.unpack(">I", header[92:96])[0],
    )
    # Only for a file with no write-ahead log beside it: while a writer checkpoints, page 1 (with the new size)
    # may reach the file before the pages it counts, and SQLite itself reports real damage anyway.
    live = Path(f"{path}-wal").exists()
    if not live and pages and change == valid_for and size < pages * page_size:
        raise StoreError(f"{_show(path)} is damaged: truncated to {size} of {pages * page_size} bytes")
    return header[18] == 2 and header[19] == 2  # file format read/write versions 2: WAL mode


def _series(name: str, rows: list[Any]) -> Series:
    return Series(
        name=name,
        step=[int(r[0]) for r in rows],
        examples=[None if r[1] is None else int(r[1]) for r in rows],
        wall_time=[float(r[2]) for r in rows],
        value=[None if r[3] is None else float(r[3]) for r in rows],
    )


def _check_column(column: str) -> None:
    if column not in COLUMNS:
        raise StoreError(f"unknown per-layer column {column!r}; expected one of {list(COLUMNS)}")


def _describe(e: sqlite3.Error) -> str:
    msg = str(e)
    if "malformed" in msg or "not a database" in msg:
        return f"the file is damaged ({msg})"
    return msg


def _show(path: Path) -> str:
    return repr(str(path))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        raise StoreError("to_numpy() needs NumPy: pip install numpy") from None
    return numpy
