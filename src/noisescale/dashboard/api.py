"""The dashboard's read-only JSON API, framework-free: each endpoint is a function of the folder, the run named in
the path and the query parameters, returning a JSON-ready dict (``server.py`` puts them on HTTP).

Every view of the page has its twin here: the runs list (``runs``), a run's header and config (``run``), its
charts (``series``), its per-layer heat map (``layers``), its alert timeline and controller decisions
(``events``), the live feed (``updates``, streamed by the server as server-sent events) and the overlay of several
runs (``compare``).
"""

from __future__ import annotations

from typing import Any

from noisescale.dashboard.catalog import RunDirectory
from noisescale.dashboard.downsample import LAYER_AGGREGATES, layer_grid, measurement_series, metric_series
from noisescale.dashboard.overview import metric_names, overview, parse_data
from noisescale.dashboard.params import ApiError, Query
from noisescale.store import StoreError
from noisescale.store.reader import MEASUREMENT_FIELDS
from noisescale.types import COLUMNS

__all__ = [
    "DEFAULT_COLUMNS",
    "PARAMETERS",
    "compare",
    "events",
    "layers",
    "run",
    "runs",
    "series",
    "update_params",
    "updates",
    "updates_since",
]

DEFAULT_COLUMNS = ("b_simple", "b_simple_low", "b_simple_high", "batch_size", "grad_sq", "trace_cov")
DEFAULT_POINTS = 1000
MAX_POINTS = 20_000
MAX_STEP = 2**62
MAX_LIMIT = 100_000

# The query parameters each endpoint takes (the OpenAPI document and the server read them from here).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "runs": (),
    "run": (),
    "series": ("columns", "metrics", "points", "after"),
    "layers": ("column", "kind", "points", "agg", "limit", "order"),
    "events": ("kind", "after", "limit"),
    "updates": ("columns", "step", "metric_id", "event_id", "limit"),
    "stream": ("columns", "step", "metric_id", "event_id", "limit", "interval"),
    "compare": ("runs", "column", "metric", "points"),
}


def runs(directory: RunDirectory, query: Query) -> dict[str, Any]:
    """Every run in the folder with its key numbers (newest first); files that cannot be read, with the reason."""
    out: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    for f in directory.files():
        if f.refused is not None:
            unreadable.append({"file": f.file, "error": f.refused})
            continue
        try:
            with directory.open(f) as reader:
                out.append(overview(reader, f))
        except (ApiError, StoreError) as e:
            unreadable.append({"file": f.file, "error": e.message if isinstance(e, ApiError) else str(e)})
    out.sort(key=lambda r: (r["started_at"], r["id"]), reverse=True)  # two runs may start in the same second
    return {"runs": out, "unreadable": unreadable}


def run(directory: RunDirectory, ref: str, query: Query) -> dict[str, Any]:
    """One run's key numbers, config, metric names and layer count."""
    f = directory.find(ref)
    with directory.open(f) as reader:
        return overview(reader, f, detail=True)


def series(directory: RunDirectory, ref: str, query: Query) -> dict[str, Any]:
    """Measurement columns and metrics over time, downsampled to at most ``points`` buckets each."""
    columns = query.names("columns", choices=MEASUREMENT_FIELDS)
    columns = list(DEFAULT_COLUMNS) if columns is None else columns
    wanted = query.names("metrics")
    points = _points(query)
    after = query.integer("after", None, low=-1, high=MAX_STEP)
    f = directory.find(ref)
    with directory.open(f) as reader, reader.snapshot():
        keys = metric_names(reader) if wanted is None else wanted
        cursor = _cursor(reader)
        return {
            "id": f.id,
            "points": points,
            "after": after,
            "measurements": (
                measurement_series(reader, columns, points=points, after=after, cache=directory.cache)
                if columns
                else _no_rows()
            ),
            "metrics": {k: metric_series(reader, k, points=points, after=after, cache=directory.cache) for k in keys},
            "cursor": cursor,
        }


def layers(directory: RunDirectory, ref: str, query: Query) -> dict[str, Any]:
    """The per-layer heat map: one row per layer (noisiest first by default), one column per step bucket."""
    column = query.choice("column", "b_simple", COLUMNS)
    kind = query.choice("kind", "param", ("param", "module"))
    points = query.integer("points", 200, low=1, high=MAX_POINTS)
    assert points is not None
    agg = query.choice("agg", "max", tuple(LAYER_AGGREGATES))
    limit = query.integer("limit", 100, low=1, high=MAX_LIMIT)
    assert limit is not None
    order = query.choice("order", "noisiest", ("noisiest", "name", "model"))
    f = directory.find(ref)
    with directory.open(f) as reader, reader.snapshot():
        named = reader.query("SELECT id, name FROM layers WHERE kind = ? ORDER BY id", (kind,))
        latest: dict[int, Any] = {}
        for lid, _ in named:
            r = reader.query(
                f"SELECT {column} FROM layer_measurements WHERE layer_id = ? AND {column} IS NOT NULL "
                "ORDER BY step DESC LIMIT 1",
                (lid,),
            )
            latest[int(lid)] = r[0][0] if r else None
        chosen = [(int(lid), str(name)) for lid, name in named]
        if order == "noisiest":
            # Highest latest value first; layers without a value yet last, in model order.
            chosen.sort(key=lambda item: (latest[item[0]] is None, -(latest[item[0]] or 0.0)))
        elif order == "name":
            chosen.sort(key=lambda item: item[1])
        chosen = chosen[:limit]
        grid = layer_grid(reader, column, [lid for lid, _ in chosen], points=points, agg=agg, cache=directory.cache)
    values = grid.pop("values")
    return {
        "id": f.id,
        "column": column,
        "kind": kind,
        "agg": agg,
        "order": order,
        "total_layers": len(named),
        **grid,
        "layers": [
            {"name": name, "latest": latest[lid], "values": row}
            for (lid, name), row in zip(chosen, values, strict=True)
        ],
    }


def events(directory: RunDirectory, ref: str, query: Query) -> dict[str, Any]:
    """The run's events in order (alerts, controller decisions, notes), optionally of one kind, after an id."""
    kinds = query.names("kind")
    after = query.integer("after", 0, low=0, high=MAX_STEP)
    limit = query.integer("limit", 1000, low=1, high=MAX_LIMIT)
    assert after is not None and limit is not None
    f = directory.find(ref)
    with directory.open(f) as reader:
        rows = _events(reader, after=after, limit=limit + 1, kinds=kinds)
    return {
        "id": f.id,
        "events": rows[:limit],
        "more": len(rows) > limit,
        "cursor": rows[:limit][-1]["id"] if rows else after,
    }


def updates(directory: RunDirectory, ref: str, query: Query) -> dict[str, Any]:
    """What was written since a cursor (the last step, metric row and event seen): new measurement rows, new
    metric rows, new events and the key numbers now.  ``reset`` is true when more than ``limit`` new rows came:
    fetch ``series`` again instead of appending."""
    return updates_since(directory, ref, **update_params(query))


def update_params(query: Query) -> dict[str, Any]:
    """The checked parameters of ``updates`` (and of the event stream): ``columns``, the cursor, ``limit``."""
    columns = query.names("columns", choices=MEASUREMENT_FIELDS)
    out = {
        "columns": list(DEFAULT_COLUMNS) if columns is None else columns,
        "step": query.integer("step", -1, low=-1, high=MAX_STEP),
        "metric_id": query.integer("metric_id", 0, low=0, high=MAX_STEP),
        "event_id": query.integer("event_id", 0, low=0, high=MAX_STEP),
        "limit": query.integer("limit", 20_000, low=1, high=MAX_LIMIT),
    }
    return out


def updates_since(
    directory: RunDirectory, ref: str, *, columns: list[str], step: int, metric_id: int, event_id: int, limit: int
) -> dict[str, Any]:
    """``updates`` with its parameters already checked (the server's event stream calls this each tick)."""
    f = directory.find(ref)
    with directory.open(f) as reader, reader.snapshot():
        meas = measurement_series(reader, columns, points=limit, after=step)
        metric_rows = reader.query(
            "SELECT m.id, m.key, m.step, COALESCE(m.examples, (SELECT s.examples FROM measurements s "
            "WHERE s.step = m.step)), m.wall_time, m.value FROM metrics m WHERE m.id > ? ORDER BY m.id LIMIT ?",
            (metric_id, limit + 1),
        )
        new_events = _events(reader, after=event_id, limit=limit + 1, kinds=None)
        head = overview(reader, f)
        cursor = _cursor(reader)
    reset = meas["downsampled"] or len(metric_rows) > limit or len(new_events) > limit
    metrics: dict[str, dict[str, Any]] = {}
    for _, key, mstep, examples, wall, value in metric_rows[:limit]:
        m = metrics.setdefault(
            key, {"rows": 0, "downsampled": False, "bucket_steps": 1, "step": [], "examples": [], "wall_time": [],
                  "values": {"value": []}}
        )  # fmt: skip
        m["rows"] += 1
        m["step"].append(int(mstep))
        m["examples"].append(None if examples is None else int(examples))
        m["wall_time"].append(wall)
        m["values"]["value"].append(value)
    if reset:
        # Too much at once to append: the client fetches `series` again; move the cursor past all of it.
        meas = {**meas, "step": [], "examples": [], "wall_time": [], "values": {c: [] for c in columns}}
        metrics = {}
    else:
        cursor = {
            "step": meas["step"][-1] if meas["step"] else step,
            "metric_id": int(metric_rows[-1][0]) if metric_rows else metric_id,
            "event_id": new_events[-1]["id"] if new_events else event_id,
        }
    return {
        "id": f.id,
        "status": head["status"],
        "reset": reset,
        "overview": head,
        "measurements": meas,
        "metrics": metrics,
        "events": [] if reset else new_events,
        "cursor": cursor,
    }


def compare(directory: RunDirectory, query: Query) -> dict[str, Any]:
    """One measurement column (``column``) or one metric (``metric``) of several runs, for an overlay."""
    refs = query.names("runs")
    if not refs:
        raise ApiError(400, "query parameter 'runs' is required: run ids separated by ',' (GET /api/runs lists them)",
                       parameter="runs")  # fmt: skip
    metric = query.names("metric")
    column = query.choice("column", "b_simple", MEASUREMENT_FIELDS) if metric is None else None
    if metric is not None:
        if query.has("column"):
            raise ApiError(400, "give either 'column' (a measurement) or 'metric' (a logged metric), not both",
                           parameter="metric")  # fmt: skip
        if len(metric) != 1:
            raise ApiError(400, f"query parameter 'metric' names one metric, got {metric}", parameter="metric")
    points = _points(query)
    out = []
    for ref in refs:
        f = directory.find(ref)
        with directory.open(f) as reader, reader.snapshot():
            info = reader.info
            if metric is not None:
                s = metric_series(reader, metric[0], points=points, cache=directory.cache)
            else:
                assert column is not None
                s = measurement_series(reader, [column], points=points, cache=directory.cache)
                s["values"] = {"value": s["values"][column]}
        out.append({"id": f.id, "name": info.name, "status": info.status, "series": s})
    return {"column": column, "metric": None if metric is None else metric[0], "points": points, "runs": out}


def _no_rows() -> dict[str, Any]:
    return {"rows": 0, "downsampled": False, "bucket_steps": 1, "step": [], "examples": [], "wall_time": [],
            "values": {}}  # fmt: skip


def _points(query: Query) -> int:
    points = query.integer("points", DEFAULT_POINTS, low=1, high=MAX_POINTS)
    assert points is not None
    return points


def _cursor(reader: Any) -> dict[str, int]:
    step, mid, eid = reader.query(
        "SELECT (SELECT max(step) FROM measurements), (SELECT max(id) FROM metrics), (SELECT max(id) FROM events)"
    )[0]
    return {"step": -1 if step is None else int(step), "metric_id": int(mid or 0), "event_id": int(eid or 0)}


def _events(reader: Any, *, after: int, limit: int, kinds: list[str] | None) -> list[dict[str, Any]]:
    params: list[Any]
    where, params = "e.id > ?", [after]
    if kinds:
        where += f" AND e.kind IN ({', '.join('?' * len(kinds))})"
        params += kinds
    # As RunReader.events: an event written before its step's measurement takes the measurement's examples.
    rows = reader.query(
        "SELECT e.id, e.step, COALESCE(e.examples, s.examples), e.wall_time, e.kind, e.message, e.data "
        f"FROM events e LEFT JOIN measurements s ON s.step = e.step WHERE {where} ORDER BY e.id LIMIT ?",
        (*params, limit),
    )
    return [
        {
            "id": int(eid),
            "step": step,
            "examples": examples,
            "wall_time": wall,
            "kind": kind,
            "message": message,
            "data": parse_data(data),
        }
        for eid, step, examples, wall, kind, message, data in rows
    ]
