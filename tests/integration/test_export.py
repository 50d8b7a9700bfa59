"""``noisescale export RUN --to tensorboard|csv``: the exported files hold the run store's values."""

from __future__ import annotations

import csv
import importlib.util
import sys

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.alerts import AlertEngine, Check, Rule
from noisescale.cli.main import main
from noisescale.store import Run, open_run
from noisescale.types import COLUMNS

STEPS = 6


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    rule = Rule(name="third", check=lambda h: Check(h.latest.step == 3), summary="the third step", action="none")
    with Run("exp", dir=tmp / "runs") as run:
        monitor = ns.GNSMonitor(model, sinks=[run, AlertEngine([rule], channels=[])])
        for _ in range(STEPS):
            x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(batch_size=8)
            monitor.log({"loss": loss})
            model.zero_grad()
        monitor.close()
    return run.path


def test_export_to_csv(run_file, tmp_path, capsys):
    out = tmp_path / "csv"
    assert main(["export", str(run_file), "--to", "csv", "-o", str(out)]) == 0
    assert f"exported {STEPS} measurements, {STEPS} metric values and 2 events" in capsys.readouterr().out
    with open_run(run_file) as reader:
        stored = reader.measurements()
        layer = {(n, s): v for n in reader.layer_names() for s, v in zip(*_ls(reader, n))}
        loss = reader.metric("loss")
    with open(out / "measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == STEPS
    for row, want in zip(rows, stored):
        for c in (*COLUMNS, "wall_time", "coverage"):
            assert (None if row[c] == "" else float(row[c])) == want[c], c
    with open(out / "layers.csv", newline="") as f:
        got = {
            (r["name"], int(r["step"])): None if r["b_simple"] == "" else float(r["b_simple"])
            for r in csv.DictReader(f)
            if r["kind"] == "param"
        }
    assert got == layer
    with open(out / "metrics.csv", newline="") as f:
        assert [float(r["value"]) for r in csv.DictReader(f)] == loss.value
    with open(out / "events.csv", newline="") as f:
        assert [(r["kind"], r["step"]) for r in csv.DictReader(f)] == [("alert", "3"), ("alert", "4")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_export_to_tensorboard(run_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out = tmp_path / "tb"
    assert main(["export", str(run_file), "--to", "tensorboard", "-o", str(out), "--x", "examples"]) == 0
    acc = EventAccumulator(str(out), size_guidance={"tensors": 0})
    acc.Reload()

    def read(tag):
        return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}

    with open_run(run_file) as reader:
        stored = reader.measurements()
        for name in reader.layer_names("module"):
            s = reader.layer_series(name, "trace_cov", kind="module")
            assert read(f"noisescale/modules/{name}/trace_cov") == dict(zip(s.examples, s.value))
        loss = reader.metric("loss")
    # An undefined value (None in the store) is not written: TensorBoard has no missing value.
    assert read("noisescale/b_simple") == {r["examples"]: r["b_simple"] for r in stored if r["b_simple"] is not None}
    assert read("noisescale/band/low") == {
        r["examples"]: r["b_simple_low"] for r in stored if r["b_simple_low"] is not None
    }
    assert read("loss") == dict(zip(loss.examples, loss.value))
    assert sorted(e.step for e in acc.Tensors("noisescale/events/text_summary")) == [24, 32]


def test_export_refuses_a_folder_in_use_and_names_a_missing_extra(run_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["export", str(run_file), "--to", "csv", "-o", str(tmp_path / "busy")]) == 1
    assert "is not an empty folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["export", str(run_file), "--to", "tensorboard", "-o", str(tmp_path / "tb")]) == 1
    assert "pip install 'noisescale[tensorboard]'" in capsys.readouterr().err
    assert main(["export", "no-such-run", "--to", "csv", "--dir", str(tmp_path)]) == 1
    assert main(["export", str(run_file), "--to", "parquet"]) == 2


def _ls(reader, name):
    s = reader.layer_series(name, "b_simple")
    return s.step, s.value
