"""The dashboard's JSON API over run stores written by a real (tiny) training, finished and still being written.

Every answer is checked against the OpenAPI document the server publishes, and its numbers against what
``RunReader`` reads from the same file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="needs the dashboard extra: pip install 'noisescale[dashboard]'")
pytest.importorskip("uvicorn", reason="needs the dashboard extra: pip install 'noisescale[dashboard]'")
pytest.importorskip("openapi_core", reason="needs openapi-core (the dashboard-test extra)")

from tests.helpers.dashboard_http import OpenApi, request, sse_events, url
from tests.helpers.training_runs import MARKUP, LiveTraining, train_run

from noisescale.dashboard import DashboardServer
from noisescale.dashboard.api import DEFAULT_COLUMNS
from noisescale.store import RunReader

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    first = train_run(root, name="first", steps=40, seed=0)
    second = train_run(root, name="second", steps=24, seed=1, events=False)
    (root / "broken.sqlite").write_bytes(b"not a database at all, just some bytes" * 10)
    return {"root": root, "first": first, "second": second}


@pytest.fixture(scope="module")
def server(folder: dict[str, Path]):
    with DashboardServer(folder["root"], port=0, poll_interval=0.05).start() as s:
        yield s


@pytest.fixture(scope="module")
def spec() -> OpenApi:
    return OpenApi()


def _num(v):
    return math.inf if v == "inf" else -math.inf if v == "-inf" else v


def test_runs_list_has_every_run_with_its_key_numbers(server, folder, spec):
    doc = spec.check(server.port, "/api/runs").json()
    ids = [r["id"] for r in doc["runs"]]
    assert ids == [folder["second"].stem, folder["first"].stem]  # newest first
    assert [u["file"] for u in doc["unreadable"]] == ["broken.sqlite"]
    assert "not" in doc["unreadable"][0]["error"]
    for row in doc["runs"]:
        with RunReader(folder["root"] / row["file"]) as reader:
            rows = reader.measurements()
            last_b = next(r for r in reversed(rows) if r["b_simple"] is not None)
            loss = reader.metric("loss")
            assert row["name"] == reader.info.name and row["status"] == "finished"
            assert row["last_step"] == rows[-1]["step"] and row["first_step"] == rows[0]["step"]
            assert row["examples"] == rows[-1]["examples"] and row["batch_size"] == rows[-1]["batch_size"]
            assert row["b_simple"] == {
                "step": last_b["step"],
                "value": last_b["b_simple"],
                "low": last_b["b_simple_low"],
                "high": _num(last_b["b_simple_high"]),
            }
            assert row["loss"] == {"step": loss.step[-1], "value": loss.value[-1]}
            assert row["lr"]["value"] == reader.metric("lr").value[-1]
            assert row["events"] == len(reader.events())
            assert row["layers"] == len(reader.layer_names())
    first = next(r for r in doc["runs"] if r["id"] == folder["first"].stem)
    assert first["alerts"]["events"] == 2 and first["alerts"]["firing"] == []  # fired, then resolved
    assert first["controller_decisions"] == 1


def test_run_detail_holds_the_config_and_metric_names(server, folder, spec):
    rid = folder["first"].stem
    doc = spec.check(server.port, f"/api/runs/{rid}", run=rid).json()
    with RunReader(folder["first"]) as reader:
        assert doc["config"] == reader.info.config
        assert doc["config"]["note"] == MARKUP  # markup is data, returned as it was written
        assert doc["metrics"] == reader.metric_names() == ["accuracy", "loss", "lr"]
        assert doc["modules"] == len(reader.layer_names("module"))
    # The run id recorded in the file and the file name address the same run.
    for ref in (folder["first"].name, doc["run_id"]):
        assert spec.check(server.port, f"/api/runs/{ref}", run=ref).json()["id"] == rid


def test_series_as_stored_when_short(server, folder, spec):
    rid = folder["first"].stem
    doc = spec.check(server.port, f"/api/runs/{rid}/series", {"points": 1000}, run=rid).json()
    m = doc["measurements"]
    assert not m["downsampled"] and m["rows"] == 40
    with RunReader(folder["first"]) as reader:
        for column in DEFAULT_COLUMNS:
            s = reader.series(column)
            assert m["step"] == s.step and m["examples"] == s.examples and m["wall_time"] == s.wall_time
            assert [_num(v) for v in m["values"][column]] == s.value, column
        assert set(doc["metrics"]) == set(reader.metric_names())
        for key, got in doc["metrics"].items():
            s = reader.metric(key)
            assert got["step"] == s.step and got["values"]["value"] == s.value and got["examples"] == s.examples
    assert doc["cursor"]["step"] == 40


def test_series_downsampled_keeps_every_extreme(server, folder, spec):
    rid = folder["first"].stem
    doc = spec.check(
        server.port, f"/api/runs/{rid}/series", {"points": 10, "columns": "b_simple,grad_sq", "metrics": "loss"},
        run=rid,
    ).json()  # fmt: skip
    m = doc["measurements"]
    assert m["downsampled"] and m["rows"] == 40 and len(m["step"]) <= 10
    with RunReader(folder["first"]) as reader:
        for column in ("b_simple", "grad_sq"):
            stored = [v for v in reader.series(column).value if v is not None]
            got = [v for v in m["values"][column] if v is not None]
            assert set(got) <= set(stored)  # nothing made up
            assert min(got) == min(stored) and max(got) == max(stored)
        loss = reader.metric("loss").value
        got = doc["metrics"]["loss"]["values"]["value"]
        assert min(got) == min(loss) and max(got) == max(loss) and set(got) <= set(loss)
    assert m["step"][0] == 1 and m["step"][-1] == 40 and m["step"] == sorted(m["step"])


def test_series_after_a_step_and_choosing_nothing(server, folder, spec):
    rid = folder["first"].stem
    doc = spec.check(server.port, f"/api/runs/{rid}/series", {"after": 30, "metrics": ""}, run=rid).json()
    assert doc["measurements"]["step"] == list(range(31, 41)) and doc["metrics"] == {}
    doc = spec.check(server.port, f"/api/runs/{rid}/series", {"columns": "", "metrics": "lr"}, run=rid).json()
    assert doc["measurements"]["step"] == [] and list(doc["metrics"]) == ["lr"]


def test_layers_heat_map_noisiest_first(server, folder, spec):
    rid = folder["first"].stem
    doc = spec.check(server.port, f"/api/runs/{rid}/layers", {"points": 200}, run=rid).json()
    with RunReader(folder["first"]) as reader:
        latest = {k: v["b_simple"] for k, v in reader.latest_layers().items()}
        matrix = reader.layer_matrix("b_simple")
    names = [layer["name"] for layer in doc["layers"]]
    assert sorted(names) == sorted(matrix.names) and doc["total_layers"] == len(matrix.names)
    assert names == sorted(latest, key=lambda n: -latest[n])
    assert not doc["downsampled"] and doc["step"] == matrix.step == doc["step_end"]
    for layer in doc["layers"]:
        assert layer["values"] == matrix.values[matrix.names.index(layer["name"])]
        assert layer["latest"] == latest[layer["name"]]
    # Downsampled: each column is the max over its steps (checked against the full matrix).
    small = spec.check(server.port, f"/api/runs/{rid}/layers", {"points": 6, "agg": "max"}, run=rid).json()
    assert small["downsampled"] and len(small["step"]) <= 6
    for layer in small["layers"]:
        full = matrix.values[matrix.names.index(layer["name"])]
        for j, (lo, hi) in enumerate(zip(small["step"], small["step_end"])):
            ref = [v for s, v in zip(matrix.step, full) if lo <= s <= hi and v is not None]
            assert layer["values"][j] == max(ref)
    by_name = spec.check(server.port, f"/api/runs/{rid}/layers", {"order": "name", "limit": 2}, run=rid).json()
    assert [x["name"] for x in by_name["layers"]] == sorted(matrix.names)[:2]


def test_events_alerts_and_decisions(server, folder, spec):
    rid = folder["first"].stem
    doc = spec.check(server.port, f"/api/runs/{rid}/events", run=rid).json()
    with RunReader(folder["first"]) as reader:
        stored = reader.events()
    assert [{k: v for k, v in e.items() if k != "id"} for e in doc["events"]] == stored
    assert [e["data"]["state"] for e in doc["events"] if e["kind"] == "alert"] == ["firing", "resolved"]
    alerts = spec.check(server.port, f"/api/runs/{rid}/events", {"kind": "alert", "limit": 1}, run=rid).json()
    assert len(alerts["events"]) == 1 and alerts["more"] and alerts["events"][0]["message"].endswith(MARKUP)
    rest = spec.check(server.port, f"/api/runs/{rid}/events", {"kind": "alert", "after": alerts["cursor"]}, run=rid)
    assert [e["data"]["state"] for e in rest.json()["events"]] == ["resolved"]
    ctrl = spec.check(server.port, f"/api/runs/{rid}/events", {"kind": "controller"}, run=rid).json()["events"]
    assert ctrl[0]["data"]["after"]["batch_size"] == 32 and "doubling" in ctrl[0]["message"]


def test_an_event_written_before_its_steps_measurement_gets_its_examples(tmp_path, spec):
    # The event and the measurement travel on different threads: the event may land first, without examples.
    from tests.helpers.training_runs import TinyTraining

    from noisescale.store import Run

    with Run("early", dir=tmp_path) as run:
        run.event("note", "written before step 1's measurement", step=1)
        training = TinyTraining(run)
        training.train_step()
        training.close()
    with RunReader(run.path) as reader:
        stored = reader.events()
    assert stored[0]["examples"] == 16  # the reader fills it in from the measurement
    with DashboardServer(tmp_path, port=0, poll_interval=0.05).start() as s:
        doc = spec.check(s.port, f"/api/runs/{run.path.stem}/events", run=run.path.stem).json()
    assert [{k: v for k, v in e.items() if k != "id"} for e in doc["events"]] == stored


def test_compare_overlays_runs(server, folder, spec):
    ids = [folder["first"].stem, folder["second"].stem]
    doc = spec.check(server.port, "/api/compare", {"runs": ",".join(ids), "column": "batch_size"}).json()
    assert [r["id"] for r in doc["runs"]] == ids
    for r, path in zip(doc["runs"], (folder["first"], folder["second"])):
        with RunReader(path) as reader:
            assert r["series"]["values"]["value"] == reader.series("batch_size").value
    doc = spec.check(server.port, "/api/compare", {"runs": ids[0], "metric": "loss", "points": 8}).json()
    with RunReader(folder["first"]) as reader:
        loss = reader.metric("loss").value
    got = doc["runs"][0]["series"]["values"]["value"]
    assert doc["metric"] == "loss" and min(got) == min(loss) and max(got) == max(loss)


def test_openapi_document_describes_every_route(server, spec):
    doc = spec.check(server.port, "/api/openapi.json").json()
    assert doc == spec.document | {"info": doc["info"]}
    routes = {r.path for r in server.app.app.routes if r.path.startswith("/api")}
    assert routes == set(doc["paths"])


def test_a_run_being_written(tmp_path, spec):
    """Poll `updates` while a training writes: the rows collected equal the stored run, no gap, no repeat."""
    live = LiveTraining(tmp_path, delay=0.005).start()
    try:
        with DashboardServer(tmp_path, port=0, poll_interval=0.05).start() as s:
            live.wait_for_step(5)
            rid = live.path.stem
            listed = spec.check(s.port, "/api/runs").json()["runs"]
            assert listed[0]["status"] == "running"
            cursor = {"step": -1, "metric_id": 0, "event_id": 0}
            steps: list[int] = []
            values: list = []
            losses: list = []
            fired = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                doc = spec.check(s.port, f"/api/runs/{rid}/updates", cursor, run=rid).json()
                assert not doc["reset"]
                steps += doc["measurements"]["step"]
                values += doc["measurements"]["values"]["b_simple"]
                losses += doc["metrics"].get("loss", {"values": {"value": []}})["values"]["value"]
                cursor = doc["cursor"]
                if fired is None and live.step >= 20:
                    fired = live.fire_alert("noise far above the batch")
                if any(e["kind"] == "alert" for e in doc["events"]):
                    assert doc["events"][-1]["step"] == fired
                    break
                time.sleep(0.02)
            assert fired is not None and len(steps) >= 20
            # A downsampled read of the same live file keeps the extremes of what is there.
            part = spec.check(s.port, f"/api/runs/{rid}/series", {"points": 8}, run=rid).json()["measurements"]
            assert part["downsampled"] and part["rows"] >= len(steps)
            live.stop()
            doc = spec.check(s.port, f"/api/runs/{rid}/updates", cursor, run=rid).json()
            steps += doc["measurements"]["step"]
            values += doc["measurements"]["values"]["b_simple"]
            losses += doc["metrics"].get("loss", {"values": {"value": []}})["values"]["value"]
            assert doc["status"] == "finished"
    finally:
        live.stop()
    with RunReader(live.path) as reader:
        stored = reader.series("b_simple")
        assert steps == stored.step and [_num(v) for v in values] == stored.value
        assert losses == reader.metric("loss").value


def test_stream_sends_updates_then_ends(tmp_path, spec):
    live = LiveTraining(tmp_path, delay=0.005).start()
    try:
        with DashboardServer(tmp_path, port=0, poll_interval=0.05).start() as s:
            live.wait_for_step(3)
            rid = live.path.stem
            steps: list[int] = []
            kinds = []
            for event, data in sse_events(s.port, url(f"/api/runs/{rid}/stream", {"interval": 0.05}), timeout=60):
                kinds.append(event)
                if event == "update":
                    spec.validate_schema(data, "Updates")
                    steps += data["measurements"]["step"]
                    if len(steps) >= 30:
                        live.stop()  # the stream then sends what is left, and 'end'

                elif event == "end":
                    assert data["status"] == "finished"
                    break
            assert kinds[0] == "update" and kinds[-1] == "end"
    finally:
        live.stop()
    with RunReader(live.path) as reader:
        assert steps == reader.series("b_simple").step


def test_stream_resumes_from_last_event_id(server, folder):
    rid = folder["first"].stem
    events = list(
        sse_events(server.port, url(f"/api/runs/{rid}/stream", {"step": 35, "metric_id": 10**6, "event_id": 99}))
    )
    assert [e for e, _ in events] == ["update", "end"]
    assert events[0][1]["measurements"]["step"] == [36, 37, 38, 39, 40] and events[0][1]["events"] == []
    bad = request(server.port, f"/api/runs/{rid}/stream", headers={"Last-Event-ID": "x:y"})
    assert bad.status == 400 and "Last-Event-ID" in bad.json()["error"]
