"""``Run``: records one training run into its own SQLite file from one background thread.

The training thread only appends to a queue (no disk, no host-device sync); the writer thread turns each
``Measurement`` into plain numbers (``Measurement.to_dict()``, the one device sync, happens there) and commits
everything queued within ``flush_interval`` seconds in one transaction.  A step's measurement and its per-layer
rows are always in the same transaction, so a reader never sees half a step.  WAL mode lets readers open the file
while it is written; a process killed with SIGKILL loses at most the last ``flush_interval`` seconds.

In data-parallel training only rank 0 writes: on any other rank a ``Run`` is inactive (no file, no thread, every
method a no-op), so the same code runs everywhere.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from noisescale.columns import COLUMNS
from noisescale.errors import ConfigError
from noisescale.events import Event, Metrics, metric_values
from noisescale.store.errors import StoreError
from noisescale.store.naming import check_run_name, new_run_id, run_file_name
from noisescale.store.schema import apply_migrations

__all__ = ["Run", "RunStatus"]

RunStatus = Literal["finished", "failed", "interrupted"]
_MAX_BATCH = 5000  # items per transaction at most, so one commit stays short under a burst
_STOP = object()
_MEASUREMENT_SQL = (
    "INSERT OR REPLACE INTO measurements (step, examples, wall_time, batch_size, source, coverage, status, "
    f"skipped_steps, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * (8 + len(COLUMNS)))})"
)
_LAYER_SQL = (
    f"INSERT OR REPLACE INTO layer_measurements (layer_id, step, {', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' * (2 + len(COLUMNS)))})"
)


class Run:
    """One training run, written to ``<dir>/<name>-<id>.sqlite``.

    Args:
        name: a short name (letters, digits, ``-_.+``; see ``check_run_name``); several runs may share it.
        dir: folder of run files; created if missing.
        config: JSON-ready settings of the run (values JSON cannot hold are stored as their ``str``).
        flush_interval: seconds within which anything logged is committed to disk.

    Use it as ``GNSMonitor(model, run=run)`` to record every measurement, log your own numbers at the monitor's
    step (``m.step``, counted from 1) with ``run.log(m.step, {"loss": loss})``, and close it (or use ``with``) to
    flush::

        with Run("digits", config={"lr": 0.1}) as run:
            monitor = GNSMonitor(model, run=run)
            ...
            m = monitor.step(batch_size=len(x))
            run.log(m.step, {"loss": loss})

    On a data-parallel rank other than 0 (``torch.distributed`` initialised at construction), the run is
    inactive: ``active`` is ``False``, ``path`` is ``None`` and nothing is written.

    Raises:
        ConfigError: a bad name, config or flush interval.
        StoreError: the run file cannot be created.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        dir: str | os.PathLike[str] = "runs",
        config: Mapping[str, Any] | None = None,
        flush_interval: float = 1.0,
    ) -> None:
        self.name = check_run_name("run" if name is None else name)
        if isinstance(flush_interval, bool) or not isinstance(flush_interval, (int, float)):
            raise ConfigError(f"flush_interval must be a number of seconds, got {flush_interval!r}")
        if not (math.isfinite(flush_interval) and flush_interval > 0):
            raise ConfigError(f"flush_interval must be a positive number of seconds, e.g. 1.0, got {flush_interval!r}")
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(f"config must be a mapping (a dict of settings), got {type(config).__name__}")
        self.config: dict[str, Any] = dict(config or {})
        config_json = json.dumps(self.config, sort_keys=True, default=str)
        self.flush_interval = float(flush_interval)
        self.started_at = time.time()
        self.id = new_run_id(self.started_at)
        self.active = _is_rank_zero()
        self.path: Path | None = None
        self.closed = False
        self.status: str = "running"
        self.write_errors = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._layer_ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        if not self.active:
            return
        self._conn, self.path = self._create(Path(dir), config_json)
        self._thread = threading.Thread(target=self._loop, name=f"noisescale-run-{self.id}", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # -- training thread: only enqueue -------------------------------------------------------------------------

    def log_measurement(self, measurement: Any) -> None:
        """Queue a ``Measurement`` (called by ``GNSMonitor`` for every step); never waits on disk or device."""
        if not self.active:
            return
        self._check_open()
        self._queue.put(("m", getattr(measurement, "wall_time", None) or time.time(), measurement))

    # -- the sink interface (noisescale.sink.Sink): GNSMonitor(model, sinks=[run]) ------------------------------

    def on_measurement(self, measurement: Any) -> None:
        """Record a measurement (``noisescale.sink.Sink``); the same as ``log_measurement``."""
        self.log_measurement(measurement)

    def on_metrics(self, metrics: Metrics) -> None:
        """Record the numbers logged with ``GNSMonitor.log`` (``noisescale.sink.Sink``)."""
        if not self.active:
            return
        self._check_open()
        items = [(k, v) for k, v in metrics.values.items()]
        self._queue.put(("log", metrics.wall_time, metrics.step, metrics.examples, items))

    def on_event(self, event: Event) -> None:
        """Record an event from the monitor, a controller or an alert rule (``noisescale.sink.Sink``)."""
        if not self.active:
            return
        self._check_open()
        data = None if event.data is None else json.dumps(dict(event.data), sort_keys=True, default=str)
        self._queue.put(("event", event.wall_time, event.step, event.kind, event.message, data, event.examples))

    def log(self, step: int, metrics: Mapping[str, Any], *, examples: int | None = None) -> None:
        """Queue your own numbers for ``step``, e.g. ``run.log(m.step, {"loss": loss})`` after ``m = monitor.step()``.

        Values may be Python numbers or one-element tensors (detached and copied here, read on the writer thread,
        so a device tensor costs the training loop no sync).  ``examples`` defaults to the examples seen at the
        monitor measurement of the same step, when there is one.
        """
        if not self.active:
            return
        self._check_open()
        step = _check_int("step", step)
        if examples is not None:
            examples = _check_int("examples", examples)
        items = list(metric_values(metrics).items())  # tensors copied now, read on the writer thread
        self._queue.put(("log", time.time(), step, examples, items))

    def event(self, kind: str, message: str = "", *, step: int | None = None, data: Any = None) -> None:
        """Queue an event (an alert, a batch-size change, a note): ``kind``, a message, optional JSON ``data``."""
        if not self.active:
            return
        self._check_open()
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"event kind must be a non-empty string, got {kind!r}")
        if step is not None:
            step = _check_int("step", step)
        data_json = None if data is None else json.dumps(data, sort_keys=True, default=str)
        self._queue.put(("event", time.time(), step, kind, str(message), data_json, None))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is committed; ``False`` if ``timeout`` seconds passed first."""
        if not self.active or self.closed:
            return True
        done = threading.Event()
        self._queue.put(("flush", done))
        end = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05):
            if self._thread is None or not self._thread.is_alive():
                return False
            if end is not None and time.monotonic() >= end:
                return False
        return True

    def close(self, status: RunStatus = "finished") -> None:
        """Commit everything queued, mark the run ``status`` and close the file.  Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.status = status
        if not self.active:
            return
        atexit.unregister(self._atexit)
        self._queue.put(("stop", status))
        assert self._thread is not None
        self._thread.join()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("failed")

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "inactive (not rank 0)"
        return f"Run(name={self.name!r}, id={self.id!r}, {where}, status={self.status!r})"

    # -- creation ----------------------------------------------------------------------------------------------

    def _create(self, root: Path, config_json: str) -> tuple[sqlite3.Connection, Path]:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the run folder {str(root)!r}: {e.strerror or e}") from None
        for _ in range(100):
            path = root / run_file_name(self.name, self.id)
            try:
                # Exclusive creation: two runs can never share a file, whatever their names and clocks.
                with open(path, "xb"):
                    pass
                break
            except FileExistsError:
                self.id = new_run_id(self.started_at)
            except OSError as e:
                raise StoreError(f"cannot create the run file {str(path)!r}: {e.strerror or e}") from None
        else:  # pragma: no cover - 100 random collisions
            raise StoreError(f"could not find a free run file name in {str(root)!r}")
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses no commit
            conn.execute("PRAGMA busy_timeout = 10000")
            apply_migrations(conn)
            conn.execute(
                "INSERT INTO run (id, name, started_at, updated_at, ended_at, status, config, noisescale_version, "
                "host, pid) VALUES (?, ?, ?, ?, NULL, 'running', ?, ?, ?, ?)",
                (
                    self.id,
                    self.name,
                    self.started_at,
                    self.started_at,
                    config_json,
                    _version(),
                    socket.gethostname(),
                    os.getpid(),
                ),
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot initialise the run file {str(path)!r}: {e}") from None
        return conn, path

    # -- writer thread -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        status = "failed"
        try:
            status = self._serve()
        except BaseException as e:  # pragma: no cover - a bug in the writer; still close the file cleanly
            self._warn(f"noisescale: the run writer stopped: {e!r}")
        finally:
            self._finish(status)

    def _serve(self) -> str:
        pending: list[tuple[Any, ...]] = []
        deadline = 0.0
        stop_status: str | None = None
        waiters: list[threading.Event] = []
        while stop_status is None:
            try:
                if pending:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get()
            except queue.Empty:
                item = None
            while item is not None:
                tag = item[0]
                if tag == "flush":
                    waiters.append(item[1])
                elif tag == "stop":
                    stop_status = item[1]
                else:
                    if not pending:
                        deadline = time.monotonic() + self.flush_interval
                    pending.append(item)
                if stop_status is not None or len(pending) >= _MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            due = waiters or stop_status is not None or len(pending) >= _MAX_BATCH or time.monotonic() >= deadline
            if pending and due:
                self._write(pending)
                pending = []
            for w in waiters:
                w.set()
            waiters = []
        assert stop_status is not None
        return stop_status

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        # Convert first (device syncs happen here, outside the transaction), then one short transaction.
        rows: list[tuple[str, Any]] = []
        step_examples: dict[int, int] = {}
        for item in items:
            try:
                rows.extend(self._rows_for(item, step_examples))
            except Exception as e:  # one bad item must not lose the others
                self._warn(f"noisescale: could not record a {item[0]!r} item: {e!r}")
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in rows:
                if sql == "layers":
                    conn.executemany(_LAYER_SQL, params)
                else:
                    conn.execute(sql, params)
            conn.execute("UPDATE run SET updated_at = ?", (time.time(),))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._warn(f"noisescale: could not write {len(items)} item(s) to {self.path}: {e}")

    def _rows_for(self, item: tuple[Any, ...], step_examples: dict[int, int]) -> list[tuple[str, Any]]:
        tag, wall = item[0], item[1]
        if tag == "m":
            d = item[2].to_dict(per_layer=True)  # the device sync, on this thread
            step, examples = int(d["step"]), int(d["examples"])
            step_examples[step] = examples
            out: list[tuple[str, Any]] = [
                (
                    _MEASUREMENT_SQL,
                    (
                        step,
                        examples,
                        wall,
                        int(d["batch_size"]),
                        str(d["source"]),
                        _num(d.get("coverage")),
                        str(d["status"]),
                        int(d["skipped_steps"]),
                        *(_num(d.get(c)) for c in COLUMNS),
                    ),
                )
            ]
            layer_rows = []
            for kind, key in (("param", "layers"), ("module", "modules")):
                for lname, vals in (d.get(key) or {}).items():
                    lid = self._layer_id(kind, str(lname))
                    layer_rows.append((lid, step, *(_num(vals.get(c)) for c in COLUMNS)))
            if layer_rows:
                out.append(("layers", layer_rows))
            return out
        if tag == "log":
            _, _, step, given, items = item
            seen = step_examples.get(step) if given is None else given
            return [
                (
                    "INSERT INTO metrics (key, step, examples, wall_time, value) VALUES (?, ?, ?, ?, ?)",
                    (key, step, seen, wall, _num(value)),
                )
                for key, value in items
            ]
        if tag == "event":
            _, _, step, kind, message, data, given_examples = item
            at = given_examples if given_examples is not None or step is None else step_examples.get(step)
            return [
                (
                    "INSERT INTO events (step, examples, wall_time, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (step, at, wall, kind, message, data),
                )
            ]
        raise ValueError(f"unknown item {tag!r}")

    def _layer_id(self, kind: str, name: str) -> int:
        key = (kind, name)
        lid = self._layer_ids.get(key)
        if lid is None:
            conn = self._conn
            assert conn is not None
            # Outside the data transaction: layer names are few and harmless if a step's rows then fail.
            conn.execute("INSERT OR IGNORE INTO layers (kind, name) VALUES (?, ?)", key)
            row = conn.execute("SELECT id FROM layers WHERE kind = ? AND name = ?", key).fetchone()
            lid = int(row[0])
            self._layer_ids[key] = lid
        return lid

    def _finish(self, status: str) -> None:
        conn = self._conn
        assert conn is not None
        try:
            now = time.time()
            conn.execute("UPDATE run SET status = ?, ended_at = ?, updated_at = ?", (status, now, now))
            try:
                # Copy every commit into the main file (idle readers do not block a passive checkpoint), so the
                # .sqlite file alone holds the whole run even if a reader keeps the log alive; then, when no
                # reader holds the file, leave WAL mode: one self-contained file.  Neither step waits.
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                conn.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.Error:
                pass
        except sqlite3.Error as e:
            self._warn(f"noisescale: could not mark the run {self.path} as {status}: {e}")
        finally:
            conn.close()
            self._conn = None

    def _warn(self, message: str) -> None:
        self.write_errors += 1
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"run {self.name!r} ({self.id}) is closed; start a new Run to record more")

    def _atexit(self) -> None:
        # A run left open at interpreter exit still gets everything queued written.
        self.close("finished")


def _is_rank_zero() -> bool:
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return int(dist.get_rank()) == 0


def _check_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an int, got {value!r}")
    return value


def _num(value: Any) -> float | None:
    """A float for SQLite (``None`` for missing or NaN; infinities are kept)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    v = float(value)
    return None if math.isnan(v) else v


def _version() -> str:
    from noisescale.version import __version__

    return __version__
