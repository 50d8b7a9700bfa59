"""The dashboard's SQL downsampling against a plain-Python reference over every row, on stores with gaps in the
steps, undefined and infinite values, and metrics logged several times at one step."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path

import pytest

from noisescale.dashboard.downsample import bucket_width, layer_grid, measurement_series, metric_series
from noisescale.dashboard.params import ApiError, Query
from noisescale.store import RunReader
from noisescale.store.schema import apply_migrations
from noisescale.types import COLUMNS

N_LAYERS = 3


def _store(path: Path, *, seed: int, n: int) -> Path:
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn)
    conn.execute("INSERT INTO run VALUES ('20250101-000000-abcdef', 'synthetic', 0, 0, NULL, 'finished', '{}', "
                 "'0', NULL, NULL)")  # fmt: skip
    steps = sorted(rng.sample(range(1, 3 * n), n))  # gaps between steps
    conn.execute("BEGIN")
    for layer in range(N_LAYERS):
        conn.execute("INSERT INTO layers (kind, name) VALUES ('param', ?)", (f"l{layer}.weight",))
    for i, step in enumerate(steps):
        vals = []
        for _ in COLUMNS:
            r = rng.random()
            vals.append(None if r < 0.1 else math.inf if r < 0.13 else rng.lognormvariate(3, 1))
        conn.execute(
            f"INSERT INTO measurements VALUES (?, ?, ?, ?, 'example', 1.0, 'ok', 0, {', '.join('?' * len(COLUMNS))})",
            (step, 16 * step, 1000.0 + i, rng.choice((16, 32)), *vals),
        )
        for layer in range(N_LAYERS):
            if rng.random() < 0.9:
                conn.execute(
                    f"INSERT INTO layer_measurements VALUES (?, ?, {', '.join('?' * len(COLUMNS))})",
                    (layer + 1, step, *[rng.lognormvariate(layer, 1) for _ in COLUMNS]),
                )
        for _ in range(rng.choice((0, 1, 1, 2))):  # a metric may be missing at a step, or logged twice
            conn.execute(
                "INSERT INTO metrics (key, step, examples, wall_time, value) VALUES ('loss', ?, ?, ?, ?)",
                (step, None if rng.random() < 0.3 else 16 * step, 1000.0 + i, rng.gauss(1, 0.3)),
            )
    conn.execute("COMMIT")
    conn.close()
    return path


@pytest.fixture(scope="module", params=[0, 1])
def store(request, tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("ds") / f"s{request.param}.sqlite", seed=request.param, n=700)


def _ref_buckets(rows: list[tuple], points: int, ncols: int) -> dict:
    """Reference: every row read, buckets of w steps from the same rule, min and max in plain Python."""
    if len(rows) <= points:
        return {"downsampled": False, "points": [r[:3] + r[3:] for r in rows], "rows": len(rows)}
    w = 1
    while rows[-1][0] // w - rows[0][0] // w + 1 > max(1, points // 2):
        w *= 2
    groups: dict[int, list[tuple]] = {}
    for r in rows:
        groups.setdefault(r[0] // w, []).append(r)
    out = []
    for k in sorted(groups):
        g = groups[k]
        cols = [[r[3 + c] for r in g if r[3 + c] is not None] for c in range(ncols)]
        mins = tuple(min(c) if c else None for c in cols)
        maxs = tuple(max(c) if c else None for c in cols)
        first, last = g[0], g[-1]
        out.append((first[0], first[1], first[2], *mins))
        if last[0] != first[0] or mins != maxs:
            out.append((last[0], last[1], last[2], *maxs))
    return {"downsampled": True, "points": out, "rows": len(rows), "w": w}


def _as_points(s: dict, columns: list[str]) -> list[tuple]:
    return [
        (s["step"][i], s["examples"][i], s["wall_time"][i], *(s["values"][c][i] for c in columns))
        for i in range(len(s["step"]))
    ]


@pytest.mark.parametrize("points", [1, 2, 7, 64, 333, 699, 700, 5000])
@pytest.mark.parametrize("after", [None, 0, 500, 2000])
def test_measurement_series_matches_the_reference(store, points, after):
    columns = ["b_simple", "b_simple_high", "grad_sq", "batch_size"]
    with RunReader(store) as reader, reader.snapshot():
        got = measurement_series(reader, columns, points=points, after=after)
        rows = [
            (r["step"], r["examples"], r["wall_time"], *(r[c] for c in columns))
            for r in reader.measurements()
            if after is None or r["step"] > after
        ]
    ref = _ref_buckets(rows, points, len(columns))
    assert got["downsampled"] == ref["downsampled"] and got["rows"] == ref["rows"]
    assert _as_points(got, columns) == ref["points"]
    assert len(got["step"]) <= max(points, 1) or points == 1  # one bucket may give 2 points when points == 1
    if ref["downsampled"]:
        assert got["bucket_steps"] == ref["w"]
        for i, c in enumerate(columns):  # the extremes of the whole series survive
            stored = [r[3 + i] for r in rows if r[3 + i] is not None]
            shown = [v for v in got["values"][c] if v is not None]
            assert min(shown) == min(stored) and max(shown) == max(stored)


@pytest.mark.parametrize("points", [1, 5, 100, 2000])
@pytest.mark.parametrize("after", [None, 1000])
def test_metric_series_matches_the_reference(store, points, after):
    with RunReader(store) as reader, reader.snapshot():
        got = metric_series(reader, "loss", points=points, after=after)
        s = reader.metric("loss")
    rows = [
        (st, ex, wt, v)
        for st, ex, wt, v in zip(s.step, s.examples, s.wall_time, s.value)
        if after is None or st > after
    ]
    ref = _ref_buckets(rows, points, 1)
    assert got["rows"] == ref["rows"] and got["downsampled"] == ref["downsampled"]
    if not ref["downsampled"]:
        assert _as_points(got, ["value"]) == rows
    else:
        # x of a bucket edge: the first row logged at that step (its examples, else the measurement's).
        first_at: dict[int, tuple] = {}
        for r in rows:
            first_at.setdefault(r[0], r)
        want = [(p[0], first_at[p[0]][1], first_at[p[0]][2], p[3]) for p in ref["points"]]
        assert _as_points(got, ["value"]) == want


def test_unknown_metric_is_empty(store):
    with RunReader(store) as reader:
        got = metric_series(reader, "nope", points=10)
    assert got["rows"] == 0 and got["step"] == [] and got["values"] == {"value": []}


@pytest.mark.parametrize(("points", "agg"), [(10, "max"), (10, "min"), (37, "mean"), (5000, "max")])
def test_layer_grid_matches_the_reference(store, points, agg):
    with RunReader(store) as reader, reader.snapshot():
        got = layer_grid(reader, "b_simple", [3, 1], points=points, agg=agg)
        matrix = reader.layer_matrix("b_simple")
        steps = [r["step"] for r in reader.measurements()]
    w = bucket_width(steps[0], steps[-1], points)
    assert got["bucket_steps"] == w and got["downsampled"] == (w > 1)
    groups: dict[int, list[int]] = {}
    for s in steps:
        groups.setdefault(s // w, []).append(s)
    ref_cols = [(g[0], g[-1]) for _, g in sorted(groups.items())]
    assert list(zip(got["step"], got["step_end"])) == ref_cols
    fn = {"max": max, "min": min, "mean": lambda v: math.fsum(v) / len(v)}[agg]
    for row, lid in zip(got["values"], [3, 1]):
        full = dict(zip(matrix.step, matrix.values[lid - 1]))
        for value, (lo, hi) in zip(row, ref_cols):
            vals = [full[s] for s in steps if lo <= s <= hi and full[s] is not None]
            if not vals:
                assert value is None
            else:
                assert value == pytest.approx(fn(vals), rel=1e-12)


@pytest.mark.parametrize("points", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize(("first", "last"), [(0, 0), (1, 1000), (17, 12345), (999_000, 1_000_000), (0, 2**40)])
def test_bucket_width_is_the_smallest_power_of_two_that_fits(points, first, last):
    w = bucket_width(first, last, points)
    assert w & (w - 1) == 0
    assert last // w - first // w + 1 <= points
    assert w == 1 or last // (w // 2) - first // (w // 2) + 1 > points


def test_query_parameters_are_checked():
    q = Query([("points", "12"), ("columns", "a,b"), ("columns", "c"), ("metrics", "")], allowed=("points", "columns",
              "metrics", "after"))  # fmt: skip
    assert q.integer("points", 1, low=1, high=20) == 12 and q.integer("after", None, low=0, high=5) is None
    assert q.names("columns") == ["a", "b", "c"] and q.names("metrics") == [] and q.names("after") is None
    with pytest.raises(ApiError, match="unknown query parameter 'pionts'"):
        Query([("pionts", "1")], allowed=("points",))
    with pytest.raises(ApiError, match="given 2 times"):
        Query([("points", "1"), ("points", "2")], allowed=("points",)).integer("points", 1, low=0, high=9)
    with pytest.raises(ApiError, match=r"in \[1, 20\], got 0"):
        Query([("points", "0")], allowed=("points",)).integer("points", 1, low=1, high=20)
    with pytest.raises(ApiError, match="must be one of"):
        Query([("agg", "median")], allowed=("agg",)).choice("agg", "max", ("max", "min"))
    assert Query([("token", "x")], allowed=()).has("token")


def _append(path: Path, steps: range, *, seed: int, late_metric_at: int | None = None) -> None:
    """More rows in the store's order (as a live writer adds them), and optionally a metric logged late."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    for step in steps:
        vals = [None if rng.random() < 0.1 else rng.lognormvariate(3, 1) for _ in COLUMNS]
        conn.execute(
            f"INSERT INTO measurements VALUES (?, ?, ?, 16, 'example', 1.0, 'ok', 0, {', '.join('?' * len(COLUMNS))})",
            (step, 16 * step, 5000.0 + step, *vals),
        )
        for layer in range(N_LAYERS):
            conn.execute(
                f"INSERT INTO layer_measurements VALUES (?, ?, {', '.join('?' * len(COLUMNS))})",
                (layer + 1, step, *[rng.lognormvariate(layer, 1) for _ in COLUMNS]),
            )
        conn.execute("INSERT INTO metrics (key, step, examples, wall_time, value) VALUES ('loss', ?, ?, ?, ?)",
                     (step, 16 * step, 5000.0 + step, rng.gauss(1, 0.3)))  # fmt: skip
    if late_metric_at is not None:  # e.g. a validation loss for an earlier step, logged now: a new extreme
        conn.execute("INSERT INTO metrics (key, step, examples, wall_time, value) VALUES ('loss', ?, NULL, 0, ?)",
                     (late_metric_at, 99.0 + (late_metric_at == 7)))  # fmt: skip
    conn.execute("COMMIT")
    conn.close()


def test_kept_buckets_give_what_a_fresh_read_gives_while_the_run_grows(tmp_path):
    from noisescale.dashboard.buckets import BucketCache

    path = _store(tmp_path / "grow.sqlite", seed=3, n=600)
    cache = BucketCache()
    columns = ["b_simple", "grad_sq"]
    with RunReader(path) as reader:
        last = reader.num_steps() and reader.series("b_simple").step[-1]
    rounds = [
        (None, None),
        (range(last + 1, last + 400), None),  # grows: new buckets, maybe a new width
        (range(last + 400, last + 900), 5),
        (range(0), 7),  # the same width, only a late metric row: the kept buckets must not hide it
    ]
    for round_, (extra, late) in enumerate(rounds):
        if extra is not None:
            _append(path, extra, seed=round_, late_metric_at=late)
        for points in (40, 300):
            with RunReader(path) as reader, reader.snapshot():
                cached = (
                    measurement_series(reader, columns, points=points, cache=cache),
                    metric_series(reader, "loss", points=points, cache=cache),
                    layer_grid(reader, "b_simple", [1, 2, 3], points=points, agg="max", cache=cache),
                )
                fresh = (
                    measurement_series(reader, columns, points=points),
                    metric_series(reader, "loss", points=points),
                    layer_grid(reader, "b_simple", [1, 2, 3], points=points, agg="max"),
                )
            assert cached == fresh, (round_, points)
            if late is not None:  # the late row is seen, not hidden by a kept bucket
                assert max(cached[1]["values"]["value"]) == 99.0 + (late == 7)
    assert len(cache._entries) > 0
