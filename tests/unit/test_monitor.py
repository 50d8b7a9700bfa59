"""GNSMonitor: invariances, bad input, state_dict round trip, clean removal."""

import copy
import math

import pytest
import torch
from torch import nn

import noisescale as ns

B = 32


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batch(seed, n=B, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    # Labels mostly follow the inputs, so the mean gradient is clearly non-zero at initialisation.
    y = torch.where(torch.rand(n, generator=g) < 0.8, x[:, :3].argmax(1), torch.randint(0, 3, (n,), generator=g))
    return x, y


def use_device_path(monitor):
    """Make a monitor on a CPU take the path an accelerator takes: statistics kept as tensors, never read back."""
    monitor._engine.path = "device"
    for collector in monitor._sources.collectors.values():
        for knob in ("_host_floats", "_host_sums"):  # the collectors' own choice of Python floats
            if hasattr(collector, knob):
                setattr(collector, knob, False)


def run_step(model, monitor, x, y, *, reduction="mean", k=1, scaler=None, micro_scale=True):
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        loss = nn.functional.cross_entropy(model(xs), ys, reduction=reduction)
        if micro_scale:
            loss = loss / k
        (scaler.scale(loss) if scaler is not None else loss).backward()
    m = monitor.step(batch_size=len(x))
    return m


@pytest.mark.parametrize("source", ["example", "microbatch"])
def test_b_simple_invariant_to_mean_vs_sum_accumulation_scale_and_loss_scale(source):
    x, y = batch(1)
    values = []
    settings = [
        dict(reduction="mean", k=4),
        dict(reduction="sum", k=4),
        dict(reduction="mean", k=4, micro_scale=False),
        dict(reduction="mean", k=4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12)),
    ]
    if source == "example":
        settings += [dict(reduction="mean", k=1), dict(reduction="sum", k=2)]
    for kw in settings:
        model = make_model()
        scaler = kw.get("scaler")
        with ns.GNSMonitor(model, source=source, scaler=scaler) as mon:
            m = run_step(model, mon, x, y, **kw)
        layer = m.layers["2.weight"]
        values.append((m.trace_cov_raw / m.grad_sq_raw, layer.trace_cov_raw / layer.grad_sq_raw))
    for v in values[1:]:
        assert v[0] == pytest.approx(values[0][0], rel=1e-9)
        assert v[1] == pytest.approx(values[0][1], rel=1e-9)


def test_grad_sq_is_reported_unscaled_under_grad_scaler_before_or_after_unscale():
    x, y = batch(2)
    ref_model = make_model()
    with ns.GNSMonitor(ref_model, source="example") as mon:
        ref = run_step(ref_model, mon, x, y)
    for unscale_first in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        with ns.GNSMonitor(model, source="example", scaler=scaler) as mon:
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if unscale_first:
                scaler.unscale_(opt)
            m = mon.step(batch_size=B)
        assert m.grad_sq_raw == pytest.approx(ref.grad_sq_raw, rel=1e-9)
        assert m.trace_cov_raw == pytest.approx(ref.trace_cov_raw, rel=1e-9)


def test_per_layer_rows_add_up_to_the_total():
    model = make_model()
    x, y = batch(3)
    with ns.GNSMonitor(model, source="example") as mon:
        m = run_step(model, mon, x, y)
    assert set(m.layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(m.modules) == {"0", "2"}
    assert sum(v.trace_cov_raw for v in m.layers.values()) == pytest.approx(m.trace_cov_raw)
    assert m.modules["0"].grad_sq_raw == pytest.approx(
        m.layers["0.weight"].grad_sq_raw + m.layers["0.bias"].grad_sq_raw
    )


def test_nan_gradient_is_skipped_and_counted_without_moving_the_average():
    model = make_model()
    with ns.GNSMonitor(model, source="example") as mon:
        for s in range(5):
            m = run_step(model, mon, *batch(s))
            model.zero_grad()
        before = (m.b_simple, m.grad_sq, m.trace_cov)
        x, y = batch(99)
        x[3, 0] = float("nan")
        bad = run_step(model, mon, x, y)
        assert bad.status == "skipped" and bad.skipped_steps == 1
        assert (bad.b_simple, bad.grad_sq, bad.trace_cov) == before
        assert bad.b_simple_raw is None
        model.zero_grad()
        good = run_step(model, mon, *batch(6))
        assert good.status == "ok" and good.skipped_steps == 1 and math.isfinite(good.b_simple)


def test_fp16_style_overflow_step_is_skipped():
    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # The first step overflows float32 (as fp16 steps overflow at 65504); the scaler then backs off far.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-110)
    with ns.GNSMonitor(model, source="example", scaler=scaler) as mon:
        statuses = []
        for s in range(10):
            x, y = batch(s, dtype=torch.float32)
            # x1000 so that the first, hugely scaled backward overflows to inf like an fp16 step does.
            scaler.scale(1000 * nn.functional.cross_entropy(model(x), y)).backward()
            m = mon.step(batch_size=B)
            statuses.append(m.status)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert statuses[0] == "skipped"
    assert statuses[1:] == ["ok"] * 9 and math.isfinite(m.b_simple)
    assert m.skipped_steps == 1


def test_zero_gradient_is_explicitly_undefined():
    model = make_model()
    x, _ = batch(0)
    with ns.GNSMonitor(model, source="example") as mon:
        (0.0 * model(x).sum()).backward()
        m = mon.step(batch_size=B)
    assert m.status == "undefined"
    assert m.b_simple is None and m.b_simple_raw is None


def test_step_without_backward_is_a_clear_error():
    model = make_model()
    with ns.GNSMonitor(model, source="example") as mon:
        with pytest.raises(ns.StepError, match="no backward"):
            mon.step(batch_size=B)
    with ns.GNSMonitor(model, source="microbatch") as mon:
        with pytest.raises(ns.StepError, match="no backward"):
            mon.step(batch_size=B)


def test_batch_size_that_contradicts_the_hooks():
    model = make_model()
    with ns.GNSMonitor(model, source="example") as mon:
        x, y = batch(0)
        nn.functional.cross_entropy(model(x), y).backward()
        with pytest.raises(ns.StepError, match="hooks saw 32 examples"):
            mon.step(batch_size=64)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "32", None])
def test_non_positive_or_non_int_batch_size(bad):
    model = make_model()
    with ns.GNSMonitor(model) as mon:
        with pytest.raises(ns.ConfigError, match="positive int"):
            mon.step(batch_size=bad)


def test_frozen_parameters_are_not_measured():
    model = make_model()
    model[0].weight.requires_grad_(False)
    with ns.GNSMonitor(model, source="example") as mon:
        m = run_step(model, mon, *batch(0))
    assert "0.weight" not in m.layers and "0.bias" in m.layers
    assert m.coverage == 1.0


def test_parameters_without_gradients_are_undefined_not_a_crash():
    model = make_model()
    model.add_module("unused", nn.Linear(3, 3).double())  # never called in forward
    for source in ("example", "microbatch"):
        with ns.GNSMonitor(model, source=source) as mon:
            out = model[2](model[1](model[0](batch(0)[0])))
            nn.functional.cross_entropy(out / 2, batch(0)[1]).backward()
            out2 = model[2](model[1](model[0](batch(1)[0])))
            nn.functional.cross_entropy(out2 / 2, batch(1)[1]).backward()
            m = mon.step(batch_size=2 * B) if source == "microbatch" else None
        model.zero_grad()
        if m is not None:
            assert m.layers["unused.weight"].b_simple is None and m.status == "ok"


def test_microbatch_with_a_single_backward_warns_and_is_undefined():
    model = make_model()
    with ns.GNSMonitor(model, source="microbatch") as mon:
        with pytest.warns(RuntimeWarning, match="at least two"):
            m = run_step(model, mon, *batch(0))
    assert m.status == "undefined" and m.b_simple is None


def test_auto_picks_microbatch_under_accumulation_and_example_otherwise():
    model = make_model()
    with ns.GNSMonitor(model) as mon:
        assert mon.source is None
        run_step(model, mon, *batch(0), k=4)
        assert mon.source == "microbatch"
    model.zero_grad()
    with ns.GNSMonitor(model) as mon:
        run_step(model, mon, *batch(0), k=1)
        assert mon.source == "example"


def test_auto_measures_the_supported_layers_with_one_short_warning():
    """BatchNorm has no per-example gradients: auto without accumulation measures the rest, says so once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with ns.GNSMonitor(model) as mon:
        with pytest.warns(RuntimeWarning, match="source='auto' measures per example") as caught:
            for _ in range(3):
                x = torch.randn(16, 4)
                y = x[:, :2].argmax(1)  # a clear signal
                nn.functional.cross_entropy(model(x), y).backward()
                m = mon.step(16)
                model.zero_grad()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert (
        "'1' (BatchNorm1d" in message
        and "shares of the batch gradient" in message
        and "22% of the parameters" in message
    )
    assert mon.source == "example" and m.status == "ok" and m.b_simple is not None, m.undefined_reason
    assert m.coverage == pytest.approx((4 * 8 + 8 + 8 * 2 + 2) / (4 * 8 + 8 + 16 + 8 * 2 + 2))
    assert set(m.layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_auto_with_an_explicit_error_policy_falls_back_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with ns.GNSMonitor(model, on_unsupported="error") as mon:
        nn.functional.cross_entropy(model(x), y).backward()
        with pytest.warns(RuntimeWarning, match="example source cannot measure this model") as caught:
            m = mon.step(16)
    assert mon.source == "microbatch" and m.status == "undefined" and m.b_simple is None
    message = str(caught[0].message)
    assert "BatchNorm1d" in message and "on_unsupported='warn'" in message
    assert m.undefined_reason == message


def test_a_loss_that_couples_the_examples_refuses_the_example_source():
    model = make_model()
    with pytest.raises(ns.ConfigError, match=r"loss_couples_examples=True.*no per-example gradients"):
        ns.GNSMonitor(model, source="example", loss_couples_examples=True)
    with ns.GNSMonitor(model, loss_couples_examples=True) as mon:
        x, y = batch(0)
        m = run_step(model, mon, x, y, k=2)
        assert mon.source == "microbatch" and m.status == "ok"
    model.zero_grad()
    with ns.GNSMonitor(model, loss_couples_examples=True) as mon:
        with pytest.warns(RuntimeWarning, match="couples the examples"):
            m = run_step(model, mon, *batch(1), k=1)
        assert mon.source == "microbatch" and m.status == "undefined"


def test_one_example_per_step_says_so_without_suggesting_the_source_in_use():
    model = make_model()
    with ns.GNSMonitor(model, source="example") as mon:
        with pytest.warns(RuntimeWarning, match="only 1 example in this step") as caught:
            m = run_step(model, mon, *batch(0, n=1))
    assert m.status == "undefined" and "source='example'" not in str(caught[0].message)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="bogus"), "source must be one of"),
        (dict(halflife=-1), "halflife"),
        (dict(confidence=1.5), "confidence"),
        (dict(on_unsupported="maybe"), "on_unsupported"),
        (dict(scope="norm", source="microbatch"), "scope='norm'"),
        (dict(scaler=object()), "GradScaler"),
        (dict(run=object()), "log_measurement"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    model = make_model()
    with pytest.raises(ns.ConfigError, match=match):
        ns.GNSMonitor(model, **kwargs)
    assert not model[0]._forward_hooks  # nothing was installed


def test_model_without_trainable_parameters():
    model = make_model().requires_grad_(False)
    with pytest.raises(ns.ConfigError, match="no parameter with requires_grad"):
        ns.GNSMonitor(model)


def test_state_dict_round_trip_continues_identically():
    def train(model, mon, seeds):
        out = []
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for s in seeds:
            m = run_step(model, mon, *batch(s))
            out.append((m.b_simple, m.b_simple_low, m.b_simple_high, m.grad_sq, m.layers["0.weight"].b_simple))
            opt.step()
            opt.zero_grad()
        return out

    model = make_model()
    mon = ns.GNSMonitor(model, source="example")
    train(model, mon, range(6))
    saved_model, saved_mon = copy.deepcopy(model.state_dict()), copy.deepcopy(mon.state_dict())
    expected = train(model, mon, range(6, 10))
    mon.close()

    model2 = make_model(seed=5)
    model2.load_state_dict(saved_model)
    mon2 = ns.GNSMonitor(model2, source="example")
    mon2.load_state_dict(saved_mon)
    assert train(model2, mon2, range(6, 10)) == expected
    assert mon2.step_count == 10 and mon2.examples == 10 * B
    mon2.close()


def test_close_removes_every_hook_and_leaves_gradients_untouched():
    model = make_model()
    plain = make_model()
    x, y = batch(0)
    mon = ns.GNSMonitor(model)  # auto installs both collectors
    loss = nn.functional.cross_entropy(model(x), y)
    mon.close()
    loss.backward()  # graph built while hooks were on: they must stay silent
    nn.functional.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
        assert not p._backward_hooks
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with pytest.raises(ns.StepError, match="closed"):
        mon.step(batch_size=B)


def test_measurement_to_dict_is_plain_python():
    model = make_model()
    with ns.GNSMonitor(model, source="example") as mon:
        m = run_step(model, mon, *batch(0))
    d = m.to_dict()
    assert d["step"] == 1 and d["batch_size"] == B and d["source"] == "example"
    assert isinstance(d["trace_cov_raw"], float) and set(d["layers"]) == set(m.layers)
    assert "b_simple=" in repr(m)


def test_device_path_gives_the_host_path_numbers_end_to_end():
    """On CPU the monitor uses the host path; forcing the vectorised device path must not change any number."""

    def run(host_path):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = ns.GNSMonitor(model, source="example")
        if not host_path:
            use_device_path(mon)
        out = []
        for s in range(8):
            x, y = batch(s)
            if s == 3:
                x[0, 0] = float("nan")
            m = run_step(model, mon, x, y)
            out.append((m.status, m.skipped_steps, m.to_dict()))
            if s != 3:
                opt.step()
            opt.zero_grad()
        saved = mon.state_dict()
        mon.close()
        return out, saved

    host, host_state = run(True)
    device, device_state = run(False)
    assert [h[:2] for h in host] == [d[:2] for d in device]

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif isinstance(value, float):
                yield f"{prefix}{key}", value

    for (_, _, h), (_, _, d) in zip(host, device):
        hf, df = dict(flat(h)), dict(flat(d))
        assert hf.keys() == df.keys() and len(hf) > 30
        for key, value in hf.items():
            assert value == pytest.approx(df[key], rel=1e-9, nan_ok=True), key
    assert torch.allclose(host_state["ema"]["sums"], device_state["ema"]["sums"], rtol=1e-12)


def test_loading_a_state_saved_for_another_model_is_a_clear_error():
    model = make_model()
    with ns.GNSMonitor(model, source="example") as mon:
        run_step(model, mon, *batch(0))
        state = mon.state_dict()
    other = nn.Sequential(nn.Linear(8, 3)).double()
    with ns.GNSMonitor(other, source="example") as mon2:
        mon2.load_state_dict(state)
        x, y = batch(1)
        nn.functional.cross_entropy(other(x), y).backward()
        with pytest.raises(ns.ConfigError, match="saved for different parameters"):
            mon2.step(batch_size=B)
        assert (mon2.step_count, mon2.examples) == (state["step_count"], state["examples"])  # nothing counted
    with ns.GNSMonitor(other, source="example") as mon3:
        with pytest.raises(ns.ConfigError, match="state version"):
            mon3.load_state_dict({**state, "version": 99})


def test_bf16_autocast_measures_what_float32_measures():
    """Under CPU autocast the layers see bf16 activations; rules compute in float32 and agree with a float32 run."""
    x, y = batch(4, dtype=torch.float32)
    out = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 3))
        with ns.GNSMonitor(model, source="example") as mon:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            m = mon.step(batch_size=B)
        assert m.status == "ok"
        out[amp] = (m.grad_sq_raw, m.trace_cov_raw)
    assert out[True][1] == pytest.approx(out[False][1], rel=0.02)
    assert out[True][0] == pytest.approx(out[False][0], rel=0.05)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("source", ["example", "microbatch"])
def test_create_graph_backward_measures_the_same_and_builds_no_graph(source, host):
    """``backward(create_graph=True)`` (gradient penalties, higher-order methods) makes gradients that require grad.

    The hooks must keep their statistics out of that graph: same numbers as a plain backward, and no tensor of the
    monitor's state attached to it.
    """
    k = 2 if source == "microbatch" else 1

    def run(create_graph):
        model = make_model(seed=3)
        mon = ns.GNSMonitor(model, source=source)
        if not host:
            use_device_path(mon)
        x, y = batch(4)
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (nn.functional.cross_entropy(model(xs), ys) / k).backward(create_graph=create_graph)
        assert all(p.grad.requires_grad == create_graph for p in model.parameters())
        # What the hooks keep until step() must not hold on to the graph.
        kept = [v for c in mon._sources.collectors.values() for v in c._vals if isinstance(v, torch.Tensor)]
        assert kept or host
        assert not any(v.requires_grad for v in kept)
        m = mon.step(batch_size=len(x))
        sums = getattr(mon._engine._state, "sums", None)  # the device path's smoothing state is a tensor
        assert sums is None or (sums.grad_fn is None and not sums.requires_grad)
        rows = [m.grad_sq_raw, m.trace_cov_raw] + [
            x for v in m.layers.values() for x in (v.grad_sq_raw, v.trace_cov_raw)
        ]
        mon.close()
        model.zero_grad(set_to_none=True)  # create_graph leaves a parameter <-> gradient reference cycle
        return rows

    with_graph, plain = run(True), run(False)
    assert len(plain) == 2 * (1 + 4) and all(v is not None for v in plain) and all(t > 0 for t in plain[1::2])
    assert with_graph == pytest.approx(plain, rel=1e-12)


class _FunctionalChild(nn.Module):
    """Uses its child's weights through F.linear: the child's forward, and the hook on it, never run."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 3)

    def forward(self, x):
        return nn.functional.linear(x, self.inner.weight, self.inner.bias)


class _Skipped(nn.Module):
    """A branch that does not run in this step: no gradient, nothing wrong."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.used(x)


def test_parameters_used_outside_their_layer_are_refused_on_the_first_step():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), _FunctionalChild()).double()
    with ns.GNSMonitor(model, source="example") as mon:
        for _ in range(2):  # refused again on the next try: never measured with zeros for them
            with pytest.raises(ns.StepError, match=r"\['2.inner.weight', '2.inner.bias'\].*source='microbatch'"):
                run_step(model, mon, *batch(0))
            model.zero_grad()
        assert mon.step_count == 0


def test_a_layer_that_did_not_run_is_no_error():
    model = _Skipped().double()
    with ns.GNSMonitor(model, source="example") as mon:
        m = run_step(model, mon, *batch(0))
        assert m.status == "ok" and mon.step_count == 1
