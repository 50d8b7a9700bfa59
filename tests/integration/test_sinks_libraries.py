"""Each logging sink against its real library, read back with that library's own reader.

One short training feeds a run store and every sink at once (the libraries import slowly: one training, shared);
each test compares what its tool read back with what the run store recorded in the same training.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.alerts import AlertEngine, Check, Rule, WandbChannel
from noisescale.store import Run, open_run
from noisescale.types import COLUMNS

pytestmark = pytest.mark.slow

STEPS = 12
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "mlflow", "wandb")}


def _needs(name):
    return pytest.mark.skipif(not HAVE[name], reason=f"{name} is not installed (pip install 'noisescale[{name}]')")


def _alert_at_step_5():
    return Rule(
        name="step_five",
        check=lambda h: Check(h.latest.step >= 5, value=float(h.latest.step)),
        summary="step five was reached <b>now</b>",
        action="nothing",
        clear_for=100,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sinks")
    out = {"tmp": tmp}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        run = Run("sinks", dir=tmp / "runs")
        # W&B alerts go to the active W&B run (the WandB sink's, once created below); a no-op without one
        sinks = [run, ns.sinks.CSV(tmp / "csv"), AlertEngine([_alert_at_step_5()], channels=[WandbChannel()])]
        if HAVE["tensorboard"]:
            out["tb"] = ns.sinks.TensorBoard(tmp / "tb", layers="both", layer_columns=COLUMNS)
            sinks.append(out["tb"])
        if HAVE["mlflow"]:
            out["mlflow"] = ns.sinks.MLflow(tracking_uri=(tmp / "mlruns").as_uri(), experiment="noise", run_name="t")
            sinks.append(out["mlflow"])
        if HAVE["wandb"]:
            import wandb

            settings = wandb.Settings(console="off", disable_git=True, save_code=False, x_disable_stats=True)
            out["wandb"] = ns.sinks.WandB(project="noisescale-test", dir=str(tmp), settings=settings)
            out["wandb_dir"] = Path(out["wandb"].run.dir).parent  # .../offline-run-<time>-<id>
            sinks.append(out["wandb"])
        monitor = ns.GNSMonitor(model, sinks=sinks)
        for step in range(STEPS):
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(batch_size=16)
            monitor.log({"loss": loss, "lr": 0.1 / (step + 1)})
            model.zero_grad()
        monitor.event("note", "a <i>note</i> with markup", data={"k": 1})
        monitor.close()
        if HAVE["wandb"]:
            import wandb

            wandb.teardown()
    out["reader"] = open_run(run.path)
    yield out
    out["reader"].close()


def _stored(reader):
    """Whole-model values by step, per-layer b_simple by (kind, name, step), metrics by (key, step)."""
    whole = {r["step"]: r for r in reader.measurements()}
    layers = {}
    for kind in ("param", "module"):
        for column in COLUMNS:
            m = reader.layer_matrix(column, kind=kind)
            for i, name in enumerate(m.names):
                for j, step in enumerate(m.step):
                    layers[(kind, name, column, step)] = m.values[i][j]
    metrics = {(k, s): v for k in reader.metric_names() for s, v in zip(reader.metric(k).step, reader.metric(k).value)}
    return whole, layers, metrics


def _tag(column):
    from noisescale.sinks.tags import column_suffix

    return column_suffix(column)


def test_alert_events_reach_the_run_store(trained):
    events = trained["reader"].events()
    alerts = [e for e in events if e["kind"] == "alert"]
    assert [(e["step"], e["data"]["state"], e["data"]["rule"]) for e in alerts] == [(5, "firing", "step_five")]
    data = alerts[0]["data"]
    assert set(data) >= {"rule", "state", "severity", "action", "value", "layer"}
    assert (data["severity"], data["action"], data["value"], data["layer"]) == ("warning", "nothing", 5.0, None)
    assert alerts[0]["message"] == "step five was reached <b>now</b>"
    assert [e["kind"] for e in events] == ["alert", "note"]


@_needs("tensorboard")
def test_tensorboard_event_files_hold_the_stored_values(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    whole, layers, metrics = _stored(trained["reader"])
    acc = EventAccumulator(str(trained["tmp"] / "tb"), size_guidance={"tensors": 0})
    acc.Reload()

    def read(tag):
        return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}

    for column in (*COLUMNS, "batch_size", "skipped_steps", "coverage"):
        want = {s: r[column] for s, r in whole.items() if r[column] is not None}
        assert read(f"noisescale/{_tag(column)}") == want, column
    assert len(read("noisescale/b_simple")) == STEPS
    n_layer_tags = 0
    for (kind, name, column, step), value in layers.items():
        group = "layers" if kind == "param" else "modules"
        got = read(f"noisescale/{group}/{name}/{_tag(column)}")
        assert got.get(step) == value if value is not None else step not in got
        n_layer_tags += 1
    assert n_layer_tags == (4 + 2) * len(COLUMNS) * STEPS
    for key in ("loss", "lr"):
        assert read(key) == {s: v for (k, s), v in metrics.items() if k == key}
    assert acc.SummaryMetadata("noisescale/b_simple").plugin_data.plugin_name == "scalars"
    # the custom scalars layout: B_simple with its band (Margin), and with the batch size on one chart
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(config.tensor_proto).item())
    (category,) = layout.category
    margin, multi = category.chart
    assert (margin.margin.series[0].value, margin.margin.series[0].lower, margin.margin.series[0].upper) == (
        "noisescale/b_simple",
        "noisescale/band/low",
        "noisescale/band/high",
    )
    assert "^noisescale/batch_size$" in multi.multiline.tag and "^noisescale/b_simple$" in multi.multiline.tag
    # events as text, markup escaped
    texts = {
        e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
        for e in acc.Tensors("noisescale/events/text_summary")
    }
    assert (
        "**alert** firing" in texts[5]
        and "&lt;b&gt;now&lt;/b&gt;" in texts[5]
        and "Suggested action: nothing" in texts[5]
    )
    assert "a &lt;i&gt;note&lt;/i&gt; with markup" in texts[STEPS]


@_needs("mlflow")
def test_mlflow_file_store_holds_the_stored_values(trained):
    from mlflow.tracking import MlflowClient

    whole, layers, metrics = _stored(trained["reader"])
    client = MlflowClient((trained["tmp"] / "mlruns").as_uri())
    run = client.get_run(trained["mlflow"].run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"

    def read(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    for column in (*COLUMNS, "batch_size"):
        want = {s: r[column] for s, r in whole.items() if r[column] is not None}
        assert read(f"noisescale/{_tag(column)}") == want, column
    for (kind, name, column, step), value in layers.items():
        if kind == "param" and column == "b_simple":
            assert read(f"noisescale/layers/{name}/b_simple").get(step) == value
    assert read("loss") == {s: v for (k, s), v in metrics.items() if k == "loss"}
    path = client.download_artifacts(run.info.run_id, "noisescale/events.jsonl", str(trained["tmp"] / "dl"))
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in lines] == [("alert", 5), ("note", STEPS)]


@_needs("wandb")
def test_wandb_offline_history_holds_the_stored_values(trained):
    from tests.helpers.wandb_records import alerts, history

    whole, layers, metrics = _stored(trained["reader"])
    rows = history(trained["wandb_dir"])
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row.get("noisescale/step")
        for key, value in row.items():
            if key.startswith("_") or key == "noisescale/step" or step is None or isinstance(value, dict):
                continue
            by_key.setdefault(key, {})[step] = value
    for column in ("b_simple", "b_simple_low", "grad_sq", "trace_cov", "b_simple_raw", "batch_size"):
        want = {s: r[column] for s, r in whole.items() if r[column] is not None}
        got = {s: float(v) for s, v in by_key[f"noisescale/{_tag(column)}"].items()}
        assert got == want, column
    high = {s: r["b_simple_high"] for s, r in whole.items()}
    got_high = by_key["noisescale/band/high"]
    assert all(
        (math.isinf(v) and got_high[s] in ("Infinity", float("inf"))) or float(got_high[s]) == v
        for s, v in high.items()
    )
    for (kind, name, column, step), value in layers.items():
        if kind == "param" and column == "b_simple" and value is not None:
            assert by_key[f"noisescale/layers/{name}/b_simple"][step] == value
    assert by_key["loss"] == {s: v for (k, s), v in metrics.items() if k == "loss"}
    assert alerts(trained["wandb_dir"]) == [
        (
            "noisescale: step_five firing",
            "[warning] step_five firing at step 5: step five was reached <b>now</b>. Suggested action: nothing.",
            "WARN",
        )
    ]
    (table,) = [row["noisescale/events"] for row in rows if "noisescale/events" in row]
    doc = json.loads((trained["wandb_dir"] / "files" / table["path"]).read_text())
    assert doc["columns"] == ["step", "examples", "kind", "message", "data"]
    assert [(r[0], r[2], r[3]) for r in doc["data"]] == [
        (5, "alert", "step five was reached <b>now</b>"),
        (STEPS, "note", "a <i>note</i> with markup"),
    ]


def test_csv_files_hold_the_stored_values(trained):
    whole, layers, metrics = _stored(trained["reader"])
    folder = trained["tmp"] / "csv"

    def num(cell):
        return None if cell == "" else float(cell)

    with open(folder / "measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == sorted(whole)
    for r in rows:
        stored = whole[int(r["step"])]
        for column in (*COLUMNS, "coverage", "wall_time"):
            assert num(r[column]) == stored[column], column
        assert (int(r["batch_size"]), r["status"], r["source"]) == (
            stored["batch_size"],
            stored["status"],
            stored["source"],
        )
    with open(folder / "layers.csv", newline="") as f:
        got = {(r["kind"], r["name"], c, int(r["step"])): num(r[c]) for r in csv.DictReader(f) for c in COLUMNS}
    assert got == layers
    with open(folder / "metrics.csv", newline="") as f:
        assert {(r["key"], int(r["step"])): num(r["value"]) for r in csv.DictReader(f)} == metrics
    with open(folder / "events.csv", newline="") as f:
        events = list(csv.DictReader(f))
    assert [(e["kind"], e["step"]) for e in events] == [("alert", "5"), ("note", str(STEPS))]
