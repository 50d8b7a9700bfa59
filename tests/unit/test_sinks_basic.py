"""The sinks package without the libraries: lazy imports, clear errors, bad settings refused at construction."""

import json
import subprocess
import sys

import pytest

import noisescale as ns
from noisescale.sinks.tags import layer_tag, measurement_scalars, whole_tag

PROBE = r"""
import json, sys
import noisescale as ns
import noisescale.cli.export
outer = ("noisescale.store", "noisescale.sinks", "noisescale.alerts")
after_cli = sorted(m for m in sys.modules if m.startswith(outer))
ns.sinks.TensorBoard, ns.sinks.WandB, ns.sinks.MLflow, ns.sinks.CSV, ns.alerts.default_rules
libs = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb", "mlflow", "urllib3"))
print(json.dumps({"libs": libs, "after_cli": after_cli}))
"""


@pytest.mark.slow
def test_ns_sinks_ns_alerts_and_the_export_command_import_none_of_the_libraries():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["libs"] == []
    assert result["after_cli"] == []  # the export command imports the store and the sinks in its handler only


@pytest.mark.parametrize(
    "make, module, extra",
    [
        (lambda tmp: ns.sinks.TensorBoard(tmp), "tensorboard", "tensorboard"),
        (lambda tmp: ns.sinks.WandB(), "wandb", "wandb"),
        (lambda tmp: ns.sinks.MLflow(), "mlflow", "mlflow"),
    ],
)
def test_a_missing_library_names_its_extra(monkeypatch, tmp_path, make, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if it were not installed
    with pytest.raises(ImportError, match=rf"needs {module}: pip install 'noisescale\[{extra}\]'"):
        make(tmp_path)


def test_csv_never_overwrites_a_run(tmp_path):
    ns.sinks.CSV(tmp_path).close()
    with pytest.raises(ns.ConfigError, match="already exists"):
        ns.sinks.CSV(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x="time"), "x must be"),
        (dict(layers="all"), "layers must be"),
        (dict(layer_columns="b_simple"), "list of columns"),
        (dict(layer_columns=["b_simple", "noise"]), "unknown layer columns"),
    ],
)
def test_scalar_sink_settings_are_checked(kwargs, match):
    with pytest.raises(ns.ConfigError, match=match):
        ns.sinks.ScalarSink(**kwargs)


def test_tags_are_hierarchical():
    d = {
        "b_simple": 10.0,
        "b_simple_low": 5.0,
        "b_simple_high": float("inf"),
        "grad_sq": None,
        "batch_size": 32,
        "layers": {"0.weight": {"b_simple": 3.0, "b_simple_low": 1.0}},
        "modules": {"0": {"b_simple": 4.0}},
    }
    got = dict(measurement_scalars(d, layers=("param", "module"), layer_columns=("b_simple", "b_simple_low")))
    assert got == {
        "noisescale/b_simple": 10.0,
        "noisescale/band/low": 5.0,
        "noisescale/band/high": float("inf"),
        "noisescale/batch_size": 32.0,
        "noisescale/layers/0.weight/b_simple": 3.0,
        "noisescale/layers/0.weight/band/low": 1.0,
        "noisescale/modules/0/b_simple": 4.0,
    }  # grad_sq undefined: left out, never a 0
    assert whole_tag("b_simple_high") == "noisescale/band/high"
    assert layer_tag("module", "enc", "trace_cov") == "noisescale/modules/enc/trace_cov"


def test_on_other_ranks_the_sinks_create_and_write_nothing(tmp_path, monkeypatch):
    import torch.distributed as dist

    from noisescale.events import Event, Metrics

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    for module in ("tensorboard", "wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, module, None)  # would fail if a sink tried to import its library
    sinks = [
        ns.sinks.TensorBoard(tmp_path / "tb"),
        ns.sinks.WandB(project="p"),
        ns.sinks.MLflow(experiment="e"),
        ns.sinks.CSV(tmp_path / "csv"),
    ]

    class FakeMeasurement:
        def to_dict(self, per_layer=True):
            raise AssertionError("an inactive sink must not read the measurement")

    for sink in sinks:
        assert sink.active is False
        sink.on_measurement(FakeMeasurement())
        sink.on_metrics(Metrics(step=1, examples=8, wall_time=0.0, values={"loss": 1.0}))
        sink.on_event(Event("note", "x", step=1))
        sink.flush()
        sink.close()
    assert list(tmp_path.iterdir()) == []
