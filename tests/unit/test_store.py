"""The run store: writing in the background, reading back (live and read-only), names, schema, bad files."""

import hashlib
import math
import shutil
import sqlite3
import threading
import time
from math import inf

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.errors import ConfigError
from noisescale.store import Run, RunReader, StoreError, list_runs, open_run, resolve_run, summarize
from noisescale.store.schema import MIGRATIONS, SCHEMA_VERSION, apply_migrations
from noisescale.types import COLUMNS


class FakeMeasurement:
    """Just what ``Run.log_measurement`` uses: ``to_dict()``; records which thread called it."""

    def __init__(self, step, *, layers=3, batch_size=8, value=1.0):
        self.step = step
        self.layers = layers
        self.batch_size = batch_size
        self.value = value
        self.thread = None

    def to_dict(self, per_layer=True):
        self.thread = threading.current_thread()
        row = {c: self.value * (i + 1) for i, c in enumerate(COLUMNS)}
        return {
            "step": self.step,
            "examples": self.step * self.batch_size,
            "batch_size": self.batch_size,
            "source": "example",
            "coverage": 1.0,
            "status": "ok",
            "skipped_steps": 0,
            **row,
            "layers": {f"layer{i}.weight": dict(row) for i in range(self.layers)},
            "modules": {f"layer{i}": dict(row) for i in range(self.layers)},
        }


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_run(tmp_path, name="t", steps=5, **kw):
    with Run(name, dir=tmp_path, **kw) as run:
        for s in range(1, steps + 1):
            run.log_measurement(FakeMeasurement(s))
            run.log(s, {"loss": 1.0 / s})
    return run.path


# -- writing and reading back ----------------------------------------------------------------------------------


def test_monitor_measurements_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with Run("roundtrip", dir=tmp_path, config={"lr": 0.1, "dtype": torch.float32}) as run:
        monitor = ns.GNSMonitor(model, run=run, callbacks=[seen.append])
        for step in range(1, 13):
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(batch_size=16)
            run.log(step, {"loss": loss})  # a tensor that requires grad: detached, read on the writer thread
            opt.step()
            opt.zero_grad()
        run.event("note", "half way", step=6, data={"k": 1})
        monitor.close()
    with open_run(run.path) as r:
        info = r.info
        assert (info.name, info.status, info.id) == ("roundtrip", "finished", run.id)
        assert info.config == {"lr": 0.1, "dtype": "torch.float32"}
        assert info.schema_version == SCHEMA_VERSION
        assert r.num_steps() == 12
        b = r.series("b_simple")
        assert b.step == list(range(1, 13))
        assert b.examples == [16 * s for s in range(1, 13)]
        expected = [m.to_dict(per_layer=False) for m in seen]
        for col in COLUMNS:
            got = r.series(col).value
            want = [d[col] for d in expected]
            assert got == pytest.approx([w if w is not None else None for w in want], nan_ok=True), col
        assert r.series("batch_size").value == [16.0] * 12
        rows = r.measurements()
        assert {row["source"] for row in rows} == {"example"} and rows[-1]["coverage"] == 1.0
        assert r.layer_names() == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert r.layer_names("module") == ["0", "2"]
        w = r.layer_series("2.weight")
        assert w.step == list(range(1, 13))
        assert w.value[-1] == pytest.approx(seen[-1].layers["2.weight"].b_simple)
        latest = r.latest_layers()
        assert latest["0.bias"]["grad_sq"] == pytest.approx(seen[-1].layers["0.bias"].grad_sq)
        mat = r.layer_matrix("b_simple", max_steps=4)
        assert mat.names == r.layer_names() and len(mat.step) == 4 and len(mat.values[0]) == 4
        loss = r.metric("loss")
        assert len(loss) == 12 and loss.examples == b.examples  # filled from the measurement of the step
        assert all(v is not None and v > 0 for v in loss.value)
        values = loss.to_numpy()
        assert values.shape == (12,) and values.tolist() == pytest.approx(loss.value)
        table = loss.to_table()
        assert table.shape == (12, 4) and table[0, 0] == 1 and table[0, 1] == 16
        assert table[:, 3].tolist() == values.tolist() and table[:, 2].tolist() == loss.wall_time
        assert r.events()[0]["kind"] == "note" and r.events()[0]["data"] == {"k": 1}
        assert r.events()[0]["examples"] == 6 * 16
        s = summarize(r)
        assert s["steps"] == 12 and s["examples"] == 192 and s["layers"] == 4 and s["metrics"] == ["loss"]


def test_to_dict_runs_on_the_writer_thread_not_the_training_thread(tmp_path):
    m = FakeMeasurement(1)
    with Run("thread", dir=tmp_path) as run:
        run.log_measurement(m)
        assert m.thread is None or m.thread is not threading.main_thread()
    assert m.thread is not None and m.thread is not threading.main_thread()


def test_rows_land_within_the_flush_interval_and_readers_see_them_live(tmp_path):
    run = Run("live", dir=tmp_path, flush_interval=0.1)
    try:
        with open_run(run.path) as reader:  # opened before anything was logged
            assert reader.num_steps() == 0 and reader.info.status == "running"
            for s in range(1, 4):
                run.log_measurement(FakeMeasurement(s))
            deadline = time.monotonic() + 5
            while reader.num_steps() < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert reader.num_steps() == 3
            run.log_measurement(FakeMeasurement(4))
            assert run.flush(timeout=5)
            assert reader.num_steps() == 4
    finally:
        run.close()
    with open_run(run.path) as reader:
        assert reader.info.status == "finished" and reader.info.ended_at is not None


def test_a_reader_never_sees_half_a_step_under_heavy_writing(tmp_path):
    n_layers = 20
    run = Run("heavy", dir=tmp_path, flush_interval=0.005)
    stop = threading.Event()

    def produce():
        s = 0
        while not stop.is_set() and s < 2000:
            s += 1
            run.log_measurement(FakeMeasurement(s, layers=n_layers))
            if s % 20 == 0:
                time.sleep(0.001)

    producer = threading.Thread(target=produce)
    producer.start()
    checks = 0
    last = 0
    try:
        with open_run(run.path) as reader:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                with reader.snapshot():
                    steps = reader.series("b_simple").step
                    counts = dict(reader._query("SELECT step, count(*) FROM layer_measurements GROUP BY step"))
                assert steps == list(range(1, len(steps) + 1))  # a prefix, no holes
                assert all(counts.get(s) == 2 * n_layers for s in steps)  # every row of every step, or none
                assert set(counts) <= set(steps)
                assert len(steps) >= last
                last = len(steps)
                checks += 1
    finally:
        stop.set()
        producer.join()
        run.close()
    assert checks > 5 and last > 0


def test_two_runs_with_the_same_name_never_share_a_file(tmp_path):
    runs = [Run("same", dir=tmp_path) for _ in range(6)]
    for r in runs:
        r.log_measurement(FakeMeasurement(1))
        r.close()
    paths = {r.path for r in runs}
    assert len(paths) == 6 and len({r.id for r in runs}) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert [i.id for i in list_runs(tmp_path)] == sorted(r.id for r in runs)
    assert resolve_run("same", dir=tmp_path) == max(paths, key=lambda p: p.name.rsplit("-", 3)[1:])  # the latest
    assert resolve_run(runs[2].id, dir=tmp_path) == runs[2].path
    with pytest.raises(StoreError, match="no run 'other'"):
        resolve_run("other", dir=tmp_path)


@pytest.mark.parametrize(
    "name",
    ["a/b", "../x", "a\\b", "C:x", "<b>x</b>", "a&b", "it's", 'a"b', "", " ", "a b", "x\n", ".hidden", "-x", "x" * 65],
)
def test_bad_run_names_are_rejected_before_anything_is_written(tmp_path, name):
    with pytest.raises(ConfigError, match="run name"):
        Run(name, dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["digits", "gpt2-small_v1.2", "lr+wd", "ünïcode", "a" * 64])
def test_good_run_names(tmp_path, name):
    with Run(name, dir=tmp_path) as run:
        pass
    assert run.path.name.startswith(name + "-") and open_run(run.path).info.name == name


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="flush_interval"):
        Run("x", dir=tmp_path, flush_interval=0)
    with pytest.raises(ConfigError, match="config"):
        Run("x", dir=tmp_path, config=[1, 2])  # type: ignore[arg-type]
    with Run("x", dir=tmp_path) as run:
        with pytest.raises(ConfigError, match="metric"):
            run.log(1, {"loss": "high"})
        with pytest.raises(ConfigError, match="one-element"):
            run.log(1, {"loss": torch.ones(3)})
        with pytest.raises(ConfigError, match="step"):
            run.log(1.5, {"loss": 1.0})  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="closed"):
        run.log(2, {"loss": 1.0})


def test_an_exception_marks_the_run_failed_and_keeps_its_rows(tmp_path):
    with pytest.raises(RuntimeError), Run("boom", dir=tmp_path) as run:
        run.log_measurement(FakeMeasurement(1))
        raise RuntimeError("training diverged")
    with open_run(run.path) as r:
        assert r.info.status == "failed" and r.num_steps() == 1


def test_a_rank_other_than_zero_gets_an_inactive_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    model = nn.Linear(3, 2)
    with Run("ddp", dir=tmp_path / "runs") as run:
        assert not run.active and run.path is None
        monitor = ns.GNSMonitor(model, run=run)
        model(torch.randn(4, 3)).sum().backward()
        monitor.step(batch_size=4)
        run.log(1, {"loss": 1.0})
        run.event("x")
        assert run.flush()
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    with Run("ddp", dir=tmp_path / "runs") as run0:
        assert run0.active and run0.path is not None and run0.path.exists()


# -- schema ----------------------------------------------------------------------------------------------------


def test_migrations_are_ordered_named_and_recorded(tmp_path):
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len({m.name for m in MIGRATIONS}) == len(MIGRATIONS)
    path = small_run(tmp_path)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        recorded = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert recorded == [(m.version, m.name) for m in MIGRATIONS]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrations_apply_step_by_step_and_are_idempotent(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.sqlite", isolation_level=None)
    assert apply_migrations(conn, MIGRATIONS[:2]) == 2
    assert apply_migrations(conn) == SCHEMA_VERSION  # only the missing ones run
    assert apply_migrations(conn) == SCHEMA_VERSION
    names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
    assert names == [m.name for m in MIGRATIONS]
    conn.close()


# -- bad files: one clear error, nothing changed -----------------------------------------------------------------


def _newer(path):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from_the_future', 0)", (SCHEMA_VERSION + 1,))
    conn.close()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "empty"),
        ("text", "not an SQLite database"),
        ("truncated", "truncated"),
        ("foreign", "not a noisescale run"),
        ("newer", "newer noisescale"),
    ],
)
def test_bad_files_give_one_clear_error_and_stay_untouched(tmp_path, kind, message):
    good = small_run(tmp_path / "good", steps=30)
    bad = tmp_path / "bad.sqlite"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("step,loss\n1,0.5\n")
    elif kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        conn = sqlite3.connect(bad)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
    else:
        shutil.copy(good, bad)
        _newer(bad)
    before = digest(bad)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreError, match=message) as err:
        with open_run(bad) as r:
            summarize(r)
    assert "\n" not in str(err.value) and "bad.sqlite" in str(err.value)
    assert digest(bad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # nothing created, nothing deleted
    assert open_run(good).num_steps() == 30  # the good run is still whole


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(StoreError, match="no run file"):
        RunReader(tmp_path / "nope.sqlite")
    with pytest.raises(StoreError, match="is a folder"):
        RunReader(tmp_path)
    with pytest.raises(StoreError, match="no folder of runs"):
        open_run("digits", dir=tmp_path / "missing")
    assert not (tmp_path / "nope.sqlite").exists() and not (tmp_path / "missing").exists()


def test_logged_tensors_are_copied_so_later_in_place_changes_do_not_leak(tmp_path):
    total = torch.tensor(3.0)
    with Run("acc", dir=tmp_path, flush_interval=5.0) as run:
        run.log(1, {"loss": total})
        total.zero_()  # an accumulator reset before the writer thread reads the value
    assert open_run(run.path).metric("loss").value == [3.0]


def test_the_run_file_alone_holds_the_run_even_if_a_reader_was_attached_at_close(tmp_path):
    run = Run("copy", dir=tmp_path / "a")
    run.log_measurement(FakeMeasurement(1))
    assert run.flush(timeout=5)
    reader = open_run(run.path)
    assert reader.num_steps() == 1
    run.close()  # the reader keeps the write-ahead log alive; the commits are in the main file all the same
    reader.close()
    (tmp_path / "b").mkdir()
    copy = tmp_path / "b" / run.path.name
    shutil.copy(run.path, copy)  # only the .sqlite file, as a user would copy it
    before = digest(copy)
    with open_run(copy) as r:
        assert r.num_steps() == 1 and r.info.status == "finished"
    assert [p.name for p in (tmp_path / "b").iterdir()] == [copy.name] and digest(copy) == before


def test_series_to_numpy_gives_the_values_with_nan_for_undefined():
    from noisescale.store import Series

    s = Series("b_simple", step=[1, 2, 3], examples=[8, None, 24], wall_time=[0.5, 1.0, 1.5], value=[2.0, None, inf])
    values = s.to_numpy()
    assert values.shape == (3,) and values.dtype.name == "float64"
    assert values[0] == 2.0 and math.isnan(values[1]) and values[2] == inf
    table = s.to_table()
    assert table.shape == (3, 4) and table[0].tolist() == [1.0, 8.0, 0.5, 2.0]
    assert math.isnan(table[1, 1]) and math.isnan(table[1, 3]) and table[2, 3] == inf


def test_the_run_records_the_installed_version(tmp_path):
    import importlib.metadata

    path = small_run(tmp_path, steps=1)
    with open_run(path) as r:
        assert r.info.noisescale_version == importlib.metadata.version("noisescale")
