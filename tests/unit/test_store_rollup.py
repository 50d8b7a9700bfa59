"""The run file's rollups (buckets of steps summed up by the writer) against a plain-Python reference over every
row: written in many transactions, with steps written again, metrics logged late or at a negative step, undefined
and infinite values; and the reader's check that they count every row it sees."""

from __future__ import annotations

import math
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from noisescale.store import Run, RunReader, StoreError
from noisescale.store.rollup import Rollup, rebuild_rollups, refresh_rollups, rollup_for
from noisescale.store.schema import LAYER_ROLLUP_COLUMNS, MEASUREMENT_FIELDS, MIGRATIONS, ROLLUP_STEPS, apply_migrations
from noisescale.types import COLUMNS

W = ROLLUP_STEPS


class Meas:
    """What ``Run.log_measurement`` reads: ``to_dict()``, with per-layer values."""

    def __init__(self, step: int, rng: random.Random, *, layers: int = 3, scale: float = 1.0) -> None:
        def value() -> float | None:
            r = rng.random()
            return None if r < 0.1 else math.inf if r < 0.13 else scale * rng.lognormvariate(2, 1)

        self.d = {
            "step": step, "examples": 16 * step, "batch_size": rng.choice((16, 32)), "source": "example",
            "coverage": rng.choice((None, 1.0, 0.5)), "status": "ok", "skipped_steps": rng.randrange(3),
            **{c: value() for c in COLUMNS},
            "layers": {f"l{i}.weight": {c: value() for c in COLUMNS} for i in range(layers)},
            "modules": {"l0": {c: value() for c in COLUMNS}},
        }  # fmt: skip

    def to_dict(self, per_layer: bool = True) -> dict:
        return self.d


def _written(tmp_path: Path) -> Path:
    """A run written by ``Run`` in a dozen transactions: steps with gaps (one of many empty buckets), some written
    again (smaller values replacing an extreme), metrics at most steps, a few logged late for earlier steps, one at a
    negative step."""
    rng = random.Random(5)
    with Run("roll", dir=tmp_path) as run:
        step = 0
        for chunk in range(12):
            for _ in range(rng.randrange(1, 90)):
                step += rng.choice((1, 1, 1, 2, 7))
                run.log_measurement(Meas(step, rng))
                run.log(step, {"loss": rng.gauss(1, 0.3), "lr": 0.1})
            if chunk % 3 == 1:  # a step written again, and a late validation loss for an early step
                again = rng.randrange(1, step)
                run.log_measurement(Meas(again, rng, scale=1e-3))
                run.log(rng.randrange(0, step), {"val_loss": rng.gauss(2, 0.1)})
            if chunk == 5:
                run.log(-3, {"loss": 7.0})
                step += 5000  # empty buckets between two commits
            run.flush()
    assert run.path is not None
    return run.path


def _groups(rows: list[tuple], key_of) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key_of(r), []).append(r)
    return out


def _extremes(values: list) -> tuple:
    defined = [v for v in values if v is not None]
    return (min(defined), max(defined)) if defined else (None, None)


def _reference(path: Path) -> tuple[dict, dict, dict]:
    """The three rollups computed in Python from every row of the file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        meas = conn.execute(f"SELECT step, {', '.join(MEASUREMENT_FIELDS)} FROM measurements").fetchall()
        layers = conn.execute(
            f"SELECT layer_id, step, {', '.join(LAYER_ROLLUP_COLUMNS)} FROM layer_measurements"
        ).fetchall()
        metrics = conn.execute("SELECT key, step, value FROM metrics").fetchall()
    m_ref = {}
    for k, g in _groups([r for r in meas if r[0] >= 0], lambda r: r[0] // W).items():
        steps = [r[0] for r in g]
        ext = [x for i in range(len(MEASUREMENT_FIELDS)) for x in _extremes([r[1 + i] for r in g])]
        m_ref[k] = (len(g), min(steps), max(steps), *ext)
    l_ref = {}
    for (lid, k), g in _groups([r for r in layers if r[1] >= 0], lambda r: (r[0], r[1] // W)).items():
        agg = []
        for i in range(len(LAYER_ROLLUP_COLUMNS)):
            vals = [r[2 + i] for r in g if r[2 + i] is not None]
            agg += [*_extremes(vals), math.fsum(vals) if vals else None, len(vals)]
        l_ref[(lid, k)] = tuple(agg)
    g_ref = {}
    for (key, k), g in _groups([r for r in metrics if r[1] >= 0], lambda r: (r[0], r[1] // W)).items():
        g_ref[(key, k)] = (len(g), min(r[1] for r in g), max(r[1] for r in g), *_extremes([r[2] for r in g]))
    return m_ref, l_ref, g_ref


def _stored(path: Path) -> tuple[dict, dict, dict]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        m = {r[0]: tuple(r[1:]) for r in conn.execute("SELECT * FROM measurement_rollup")}
        layer = {(r[0], r[1]): tuple(r[2:]) for r in conn.execute("SELECT * FROM layer_rollup")}
        g = {(r[0], r[1]): tuple(r[2:]) for r in conn.execute("SELECT * FROM metric_rollup")}
    return m, layer, g


def _assert_equal(stored: tuple[dict, dict, dict], ref: tuple[dict, dict, dict]) -> None:
    m, layer, g = stored
    m_ref, l_ref, g_ref = ref
    assert m == m_ref  # counts, edges and extremes exactly, with their types (an integer stays one)
    for k, want in m_ref.items():
        assert [type(v) for v in m[k]] == [type(v) for v in want], k
    assert g == g_ref
    assert layer.keys() == l_ref.keys()
    for key, want in l_ref.items():
        got = layer[key]
        for i in range(len(LAYER_ROLLUP_COLUMNS)):
            mn, mx, total, n = got[4 * i : 4 * i + 4]
            assert (mn, mx, n) == (want[4 * i], want[4 * i + 1], want[4 * i + 3]), key
            assert (total is None) == (want[4 * i + 2] is None)
            if total is not None:  # sums in another order: equal to rounding
                assert total == pytest.approx(want[4 * i + 2], rel=1e-12)


def test_the_writer_keeps_the_rollups_equal_to_the_reference(tmp_path):
    path = _written(tmp_path)
    ref = _reference(path)
    assert len(ref[0]) > 5 and any(k[0] == "val_loss" for k in ref[2])  # several buckets, late metrics
    _assert_equal(_stored(path), ref)
    with RunReader(path) as reader, reader.snapshot():
        rollup = rollup_for(reader)
        assert rollup is not None and rollup.steps == W
        assert rollup.through_step == reader.series("b_simple").step[-1]


def test_a_rebuild_gives_what_the_writer_kept(tmp_path):
    path = _written(tmp_path)
    kept = _stored(path)
    copy = tmp_path / "copy.sqlite"
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy, isolation_level=None)
    conn.execute("BEGIN")
    rebuild_rollups(conn)
    conn.execute("COMMIT")
    conn.close()
    rebuilt = _stored(copy)
    assert rebuilt[0] == kept[0] and rebuilt[2] == kept[2]
    _assert_equal(rebuilt, _reference(copy))


def _raw_file(path: Path, migrations=MIGRATIONS) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn, migrations)
    conn.execute("INSERT INTO run VALUES ('20250101-000000-abcdef', 'raw', 0, 0, NULL, 'running', '{}', '0', NULL, "
                 "NULL)")  # fmt: skip
    return conn


def _add(conn: sqlite3.Connection, steps: range) -> None:
    conn.execute("BEGIN")
    for s in steps:
        conn.execute(
            f"INSERT OR REPLACE INTO measurements VALUES (?, ?, ?, 16, 'example', 1.0, 'ok', 0, "
            f"{', '.join('?' * len(COLUMNS))})",
            (s, 16 * s, float(s), *[float(s % 17)] * len(COLUMNS)),
        )
        conn.execute("INSERT INTO metrics (key, step, examples, wall_time, value) VALUES ('loss', ?, NULL, 0, ?)",
                     (s, 1.0 / (1 + s)))  # fmt: skip
    conn.execute("COMMIT")


def test_readers_use_the_rollups_only_when_they_count_every_row(tmp_path):
    conn = _raw_file(tmp_path / "raw.sqlite")
    _add(conn, range(1, 200))

    def state():
        with RunReader(tmp_path / "raw.sqlite") as reader, reader.snapshot():
            return rollup_for(reader)

    assert state() is None  # rows written without a refresh: not counted
    conn.execute("BEGIN")
    refresh_rollups(conn)
    conn.execute("COMMIT")
    assert state() == Rollup(steps=W, through_step=199)
    _add(conn, range(200, 201))  # one more measurement and metric row, not counted
    assert state() is None
    conn.execute("BEGIN")
    refresh_rollups(conn)
    conn.execute("COMMIT")
    assert state() == Rollup(steps=W, through_step=200)
    conn.execute("INSERT INTO metrics (key, step, examples, wall_time, value) VALUES ('loss', 3, NULL, 0, 9.0)")
    assert state() is None  # a late metric row not counted yet
    conn.close()


@pytest.mark.parametrize("version", [4, 5], ids=["first-released", "groups-without-rollups"])
def test_a_file_of_an_older_schema_is_read_without_rollups(tmp_path, version):
    conn = _raw_file(tmp_path / "old.sqlite", MIGRATIONS[:version])
    _add(conn, range(1, 50))
    conn.close()
    with RunReader(tmp_path / "old.sqlite") as reader, reader.snapshot():
        assert reader.schema_version == version
        assert rollup_for(reader) is None
        assert reader.series("b_simple").step == list(range(1, 50))


def test_a_file_below_the_first_released_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "v3.sqlite", isolation_level=None)
    apply_migrations(conn, MIGRATIONS[:3])
    conn.close()
    with pytest.raises(StoreError, match="incomplete schema"):
        RunReader(tmp_path / "v3.sqlite")
