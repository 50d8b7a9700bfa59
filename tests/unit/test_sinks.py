"""The sink seam: every sink gets every measurement, metric and event in order, from one background thread."""

import threading

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.events import Event, Metrics
from noisescale.sink import BaseSink, is_sink
from noisescale.store import Run, open_run


class Recorder(BaseSink):
    def __init__(self):
        self.items = []
        self.threads = set()
        self.flushed = 0
        self.closed = 0

    def on_measurement(self, measurement):
        self.threads.add(threading.get_ident())
        self.items.append(("m", measurement.step, measurement.b_simple_raw, measurement.status))

    def on_metrics(self, metrics):
        self.items.append(("metrics", metrics.step, metrics.examples, dict(metrics.values)))

    def on_event(self, event):
        self.items.append(("event", event.kind, event.step, event.message))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


def _train(monitor, model, steps, *, log=True):
    torch.manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        m = monitor.step(batch_size=8)
        out.append(m)
        if log:
            monitor.log({"loss": loss})  # a tensor with a graph: copied, read on the sinks' thread
        model.zero_grad()
    return out


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_every_sink_gets_everything_in_order_off_the_training_thread():
    a, b = Recorder(), Recorder()
    model = _model()
    monitor = ns.GNSMonitor(model, sinks=[a, b])
    ms = _train(monitor, model, 4)
    monitor.event("note", "half way", data={"k": 1})
    monitor.close()
    assert a.items == b.items
    want_m = [("m", m.step, m.b_simple_raw, m.status) for m in ms]
    assert [i for i in a.items if i[0] == "m"] == want_m
    metrics = [i for i in a.items if i[0] == "metrics"]
    assert [(s, e) for _, s, e, _ in metrics] == [(1, 8), (2, 16), (3, 24), (4, 32)]
    assert all(isinstance(v["loss"], float) for *_, v in metrics)
    assert a.items[-1] == ("event", "note", 4, "half way")
    # order: each step's measurement comes before the metrics logged after it
    kinds = [i[0] for i in a.items]
    assert kinds[:4] == ["m", "metrics", "m", "metrics"]
    assert threading.get_ident() not in a.threads
    assert (a.closed, b.closed) == (1, 1) and a.flushed >= 1


def test_step_never_waits_for_a_slow_sink():
    gate = threading.Event()

    class Blocked(Recorder):
        def on_measurement(self, measurement):
            gate.wait(30)
            super().on_measurement(measurement)

    sink = Blocked()
    model = _model()
    monitor = ns.GNSMonitor(model, sinks=[sink])
    _train(monitor, model, 3)  # returns although the sink is stuck on the first measurement
    assert sink.items == []
    gate.set()
    assert monitor.flush(timeout=30)
    assert [i[1] for i in sink.items if i[0] == "m"] == [1, 2, 3]
    monitor.close()


def test_a_failing_sink_warns_once_and_the_others_keep_receiving():
    class Broken(BaseSink):
        def on_measurement(self, measurement):
            raise RuntimeError("disk full")

    good = Recorder()
    model = _model()
    monitor = ns.GNSMonitor(model, sinks=[Broken(), good])
    with pytest.warns(RuntimeWarning, match="disk full") as caught:
        _train(monitor, model, 3, log=False)
        monitor.close()
    assert len([w for w in caught if "disk full" in str(w.message)]) == 1
    assert [i[1] for i in good.items] == [1, 2, 3]


def test_events_returned_by_a_sink_reach_the_other_sinks():
    class Rule(BaseSink):
        def __init__(self):
            self.seen = []

        def on_measurement(self, measurement):
            if measurement.step == 2:
                return [Event("alert", "step two", step=2, data={"rule": "demo"})]
            return None

        def on_event(self, event):
            self.seen.append(event)

    rule, other = Rule(), Recorder()
    model = _model()
    monitor = ns.GNSMonitor(model, sinks=[rule, other])
    _train(monitor, model, 3, log=False)
    monitor.close()
    assert ("event", "alert", 2, "step two") in other.items
    assert rule.seen == []  # not sent back to where it came from


def test_run_is_a_sink_and_run_argument_stays_open(tmp_path):
    model = _model()
    with Run("sink", dir=tmp_path) as run:
        assert is_sink(run)
        monitor = ns.GNSMonitor(model, run=run)
        _train(monitor, model, 3)
        monitor.event("note", "from the monitor", data={"x": 2})
        monitor.close()
        assert not run.closed  # run= belongs to its owner
        run.log(3, {"extra": 1.0})
    with open_run(run.path) as r:
        assert r.num_steps() == 3
        loss = r.metric("loss")
        assert loss.step == [1, 2, 3] and loss.examples == [8, 16, 24]
        assert r.metric("extra").value == [1.0]
        (event,) = r.events()
        assert (event["kind"], event["step"], event["examples"], event["data"]) == ("note", 3, 24, {"x": 2})


def test_sinks_argument_closes_the_run(tmp_path):
    model = _model()
    run = Run("owned", dir=tmp_path)
    monitor = ns.GNSMonitor(model, sinks=[run])
    _train(monitor, model, 2)
    monitor.close()
    assert run.closed and run.status == "finished"
    with open_run(run.path) as r:
        assert r.num_steps() == 2 and len(r.metric("loss")) == 2


def test_callbacks_are_a_sink():
    seen = []
    model = _model()
    monitor = ns.GNSMonitor(model, callbacks=[seen.append])
    ms = _train(monitor, model, 3, log=False)
    monitor.close()
    assert [m.step for m in seen] == [1, 2, 3] and seen[-1] is ms[-1]


def test_no_sink_no_thread():
    model = _model()
    monitor = ns.GNSMonitor(model)
    before = threading.active_count()
    _train(monitor, model, 2)
    assert threading.active_count() == before
    monitor.close()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sinks=[object()]), "is not a sink"),
        (dict(sinks=Recorder()), "sinks must be a list"),
        (dict(callbacks=[3]), "callbacks must be functions"),
    ],
)
def test_bad_sinks_fail_at_construction(kwargs, match):
    with pytest.raises(ns.ConfigError, match=match):
        ns.GNSMonitor(_model(), **kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.log({"": 1.0}), "non-empty strings"),
        (lambda m: m.log({"loss": "low"}), "must be a number"),
        (lambda m: m.log({"loss": torch.ones(2)}), "one-element tensor"),
        (lambda m: m.log({"loss": 1.0}, step=-1), "non-negative int"),
        (lambda m: m.event(""), "non-empty string"),
        (lambda m: m.event("note", data=[1]), "mapping"),
    ],
)
def test_bad_log_and_event_arguments(call, match):
    monitor = ns.GNSMonitor(_model(), sinks=[Recorder()])
    with pytest.raises(ns.ConfigError, match=match):
        call(monitor)
    monitor.close()


def test_metrics_nan_becomes_none():
    sink = Recorder()
    model = _model()
    monitor = ns.GNSMonitor(model, sinks=[sink])
    monitor.log({"a": float("nan"), "b": torch.tensor(2.5), "c": None}, step=7)
    monitor.close()
    assert sink.items == [("metrics", 7, None, {"a": None, "b": 2.5, "c": None})]
    assert isinstance(Metrics(1, None, 0.0, {}), Metrics)
