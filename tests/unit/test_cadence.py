"""Measuring one step in N (``every=``) or within a share of the training time (``budget=``).

On a measured step the statistics are those of an every-step monitor, bit for bit; on the others the hooks are
disarmed (no tensor operation at all, counted with the profiler) and the measurement carries the last values.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import noisescale as ns
from noisescale.cadence import BURST, DECIDE_EVERY, MAX_EVERY, WARMUP_EVERY, BudgetInputs, Cadence, budget_every
from noisescale.estimators.smoothing import decay_for
from noisescale.sink import BaseSink


class _Net(nn.Module):
    """Every family the example source handles differently: Linear (2-D and 3-D), Conv2d, Embedding, LayerNorm,
    and nn.MultiheadAttention (measured by hooks of its own, which walk the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8 + 4 * 16, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 8)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.fc(self.ln(h + a)).mean(1)  # (B, 8)
        c = torch.relu(self.conv(img)).flatten(1)  # (B, 64)
        return self.head(torch.cat([h, c], 1))


def _batches(n: int, b: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 11, (b, 5), generator=g),
            torch.randn(b, 1, 4, 4, generator=g),
            torch.randint(0, 3, (b,), generator=g),
        )
        for _ in range(n)
    ]


def _train(monitor_kw: dict | None, steps: int, *, micro: int = 1, seed: int = 0) -> list[ns.Measurement]:
    torch.manual_seed(seed)
    model = _Net()
    monitor = ns.GNSMonitor(model, **monitor_kw) if monitor_kw is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for ids, img, y in _batches(steps, b=6 * micro):
        for i, m, t in zip(ids.chunk(micro), img.chunk(micro), y.chunk(micro)):
            (nn.functional.cross_entropy(model(i, m), t) / micro).backward()
        if monitor is not None:
            out.append(monitor.step(batch_size=ids.shape[0]))
        opt.step()
        opt.zero_grad()
    if monitor is not None:
        monitor.close()
    return out


RAW = ("grad_sq_raw", "trace_cov_raw", "b_simple_raw")


@pytest.mark.parametrize(("source", "micro"), [("example", 1), ("microbatch", 3)])
def test_measured_steps_give_the_every_step_statistics_bit_for_bit(source, micro):
    every1 = _train({"source": source}, 10, micro=micro)
    every3 = _train({"source": source, "every": 3}, 10, micro=micro)
    measured = [m for m in every3 if m.status != "unmeasured"]
    assert [m.step for m in measured] == [1, 4, 7, 10]
    for m in measured:
        ref = every1[m.step - 1]
        for col in RAW:
            assert getattr(m, col) == getattr(ref, col), (m.step, col)
        for name, layer in m.layers.items():
            assert layer.grad_sq_raw == ref.layers[name].grad_sq_raw
            assert layer.trace_cov_raw == ref.layers[name].trace_cov_raw
    assert measured[0].b_simple == every1[0].b_simple  # the first step has no history to differ by


def test_unmeasured_steps_carry_the_last_measurement_and_no_raw_values():
    ms = _train({"source": "example", "every": 4}, 6)
    assert [m.status for m in ms][1:4] == ["unmeasured"] * 3
    first, second = ms[0], ms[1]
    assert second.measured_step == 1 and second.last is first and first.last is first
    assert second.step == 2 and second.examples == 12 and second.batch_size == 6
    for col in ("b_simple", "b_simple_low", "b_simple_high", "grad_sq", "trace_cov"):
        assert getattr(second, col) == getattr(first, col)
    for col in RAW:
        assert getattr(second, col) is None
    assert second.layers["fc.weight"].grad_sq == first.layers["fc.weight"].grad_sq
    assert second.layers["fc.weight"].grad_sq_raw is None
    d = second.to_dict()
    assert d["status"] == "unmeasured" and d["measured_step"] == 1 and d["step"] == 2
    assert "measured_step" not in first.to_dict()
    assert ms[4].status != "unmeasured" and ms[4].measured_step == 5


def test_smoothing_decays_by_the_examples_since_the_last_measurement():
    """The smoothed values equal an average over the measured steps' raw estimates whose decays are those of the
    examples between them: the half-life stays counted in examples."""
    every1 = _train({"source": "example", "halflife": 40.0}, 13)
    every4 = _train({"source": "example", "halflife": 40.0, "every": 4}, 13)
    w = g = t = 0.0
    for step in (1, 5, 9, 13):
        ref = every1[step - 1]
        beta = decay_for(6 if step == 1 else 4 * 6, 40.0)
        w = beta * w + (1 - beta)
        g = beta * g + (1 - beta) * ref.grad_sq_raw
        t = beta * t + (1 - beta) * ref.trace_cov_raw
        m = every4[step - 1]
        assert m.grad_sq == pytest.approx(g / w, rel=1e-12)
        assert m.trace_cov == pytest.approx(t / w, rel=1e-12)


def _op_counts(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}


@pytest.mark.parametrize(("source", "micro"), [("example", 1), ("microbatch", 2), ("auto", 1)])
def test_a_disarmed_step_costs_no_tensor_operation(source, micro):
    """Profiler count: forward, backward and monitor.step() of an unmeasured step run exactly the operators of the
    same step without a monitor (not one more), whatever the layers (attention, conv, embedding, norms)."""
    torch.manual_seed(0)
    plain = _Net()
    watched = copy.deepcopy(plain)
    monitor = ns.GNSMonitor(watched, source=source, every=5)
    batches = _batches(3, b=6 * micro)

    def step(model: nn.Module, batch, m: ns.GNSMonitor | None) -> None:
        ids, img, y = batch
        for i, im, t in zip(ids.chunk(micro), img.chunk(micro), y.chunk(micro)):
            (nn.functional.cross_entropy(model(i, im), t) / micro).backward()
        if m is not None:
            first = m.step_count == 0
            status = m.step(batch_size=ids.shape[0]).status
            assert (status != "unmeasured") == first
        for p in model.parameters():
            p.grad = None

    step(watched, batches[0], monitor)  # measured (the first step always is)
    step(plain, batches[0], None)
    for batch in batches[1:]:
        ops_plain = _op_counts(lambda b=batch: step(plain, b, None))
        ops_watched = _op_counts(lambda b=batch: step(watched, b, monitor))
        assert ops_watched == ops_plain
    monitor.close()


def test_unmeasured_steps_do_not_reach_the_sinks_and_the_cadence_is_recorded():
    got: dict[str, list] = {"m": [], "e": []}

    class Keep(BaseSink):
        def on_measurement(self, m: ns.Measurement) -> None:
            got["m"].append((m.step, m.status))

        def on_event(self, event) -> None:
            got["e"].append((event.kind, event.step, dict(event.data or {})))

    torch.manual_seed(0)
    model = _Net()
    with ns.GNSMonitor(model, source="example", every=3, sinks=[Keep()]) as monitor:
        for ids, img, y in _batches(7):
            nn.functional.cross_entropy(model(ids, img), y).backward()
            monitor.step(batch_size=6)
            model.zero_grad()
        monitor.flush()
    assert [s for s, _ in got["m"]] == [1, 4, 7]
    assert all(status != "unmeasured" for _, status in got["m"])
    assert got["e"] == [("cadence", 1, {"every": 3})]


def test_every_step_by_default_records_no_cadence():
    events = []

    class Keep(BaseSink):
        def on_event(self, event) -> None:
            events.append(event)

    torch.manual_seed(0)
    model = _Net()
    with ns.GNSMonitor(model, source="example", sinks=[Keep()]) as monitor:
        for ids, img, y in _batches(2):
            nn.functional.cross_entropy(model(ids, img), y).backward()
            assert monitor.step(batch_size=6).status != "unmeasured"
            model.zero_grad()
    assert events == []


def test_state_dict_mid_gap_continues_identically():
    torch.manual_seed(0)
    model = _Net()
    batches = _batches(11)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ns.GNSMonitor(model, source="example", every=4)

    def run(mon: ns.GNSMonitor, mdl: nn.Module, o: torch.optim.Optimizer, bs) -> list[tuple]:
        out = []
        for ids, img, y in bs:
            nn.functional.cross_entropy(mdl(ids, img), y).backward()
            m = mon.step(batch_size=6)
            out.append((m.step, m.status, m.measured_step, m.b_simple, m.b_simple_low, m.grad_sq_raw, m.examples))
            o.step()
            o.zero_grad()
        return out

    run(monitor, model, opt, batches[:6])  # stops after step 6, inside a gap (measured: 1, 5, 9)
    saved = (copy.deepcopy(monitor.state_dict()), copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    expected = run(monitor, model, opt, batches[6:])
    monitor.close()

    model2 = _Net()
    model2.load_state_dict(saved[1])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    opt2.load_state_dict(saved[2])
    restored = ns.GNSMonitor(model2, source="example", every=4)
    restored.load_state_dict(saved[0])
    got = run(restored, model2, opt2, batches[6:])
    restored.close()
    assert got == expected
    assert [s for s, status, *_ in got if status != "unmeasured"] == [9]
    assert got[0][1] == "unmeasured" and got[0][2] == 5 and got[0][3] is not None  # the restored averages


def test_a_state_saved_with_another_cadence_is_refused():
    torch.manual_seed(0)
    model = _Net()
    monitor = ns.GNSMonitor(model, source="example", every=2)
    with pytest.raises(ns.ConfigError, match="every=2"):
        ns.GNSMonitor(_Net(), source="example", every=3).load_state_dict(monitor.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be a positive int"),
        ({"every": 2.0}, "every must be a positive int"),
        ({"budget": 0.0}, "budget must be a share"),
        ({"budget": 1.5}, "budget must be a share"),
        ({"budget": 0.03, "every": 4}, "either every=4"),
    ],
)
def test_bad_cadence_options_fail_at_construction(kwargs, match):
    with pytest.raises(ns.ConfigError, match=match):
        ns.GNSMonitor(nn.Linear(2, 2), **kwargs)


# -- the budget -------------------------------------------------------------------------------------------------


def _inputs(**kw: float | bool) -> BudgetInputs:
    base: dict = {"measure_cost": 0.3, "plain": 1.0, "unmeasured_cost": 0.0, "credit": 0.0, "moving": False}
    base.update(kw)
    return BudgetInputs(**base)


def test_budget_cadence_spends_the_budget_in_steady_state():
    assert budget_every(0.03, _inputs()) == 10  # 0.3 / (0.03 * 1.0)
    assert budget_every(0.03, _inputs(measure_cost=0.031)) == 2  # the ceiling: never above the budget
    assert budget_every(0.03, _inputs(measure_cost=0.0)) == 1  # free: every step
    # what an unmeasured step costs itself comes off what a measurement may cost
    assert budget_every(0.03, _inputs(unmeasured_cost=0.01)) == math.ceil(0.29 / 0.02)
    assert budget_every(0.03, _inputs(unmeasured_cost=0.05)) == MAX_EVERY


def test_budget_is_denser_while_b_simple_moves_then_pays_back():
    assert budget_every(0.03, _inputs(moving=True)) == 3  # ceil(10 / 4)
    assert budget_every(0.03, _inputs(moving=True, credit=-BURST * 0.3 + 1e-6)) == 3
    assert budget_every(0.03, _inputs(moving=True, credit=-BURST * 0.3 - 1e-6)) == 20
    assert budget_every(0.03, _inputs(credit=-0.01)) == 20


def test_budget_never_measures_less_often_than_sparsest():
    assert budget_every(0.03, _inputs(unmeasured_cost=0.05), sparsest=25) == 25  # alone: MAX_EVERY
    assert budget_every(0.03, _inputs(), sparsest=25) == 10  # below the floor: the budget's own choice
    assert budget_every(0.03, _inputs(credit=-0.01), sparsest=12) == 12  # paying back, held at the floor


def _simulate(cadence: Cadence, steps: int, plain: float, cost: float, band) -> tuple[list[bool], float]:
    """Drive a cadence with a fake clock: unmeasured steps take ``plain`` s, measured ones ``plain + cost``."""
    clock = [0.0]
    cadence._clock = lambda: clock[0]
    measured = []
    for step in range(1, steps + 1):
        due = cadence.due(step)
        clock[0] += plain + (cost if due else 0.0)  # the training step, with the hooks armed or not
        started = cadence.started()  # monitor.step() itself takes no time here
        cadence.finished(step, due, started, lambda s=step: band(s))
        measured.append(due)
    return measured, sum(measured) * cost / (steps * plain)


def test_budget_keeps_the_cost_within_its_share_of_training_time():
    cadence = Cadence(budget=0.03)
    measured, spent = _simulate(cadence, 3000, plain=0.01, cost=0.003, band=lambda s: (100.0, 90.0, 110.0))
    assert measured[:3] == [True, False, True]  # every other step until both kinds are timed
    assert cadence.every == 10  # the steady cadence: 0.003 / (0.03 * 0.01)
    assert spent <= 0.03 + (BURST + DECIDE_EVERY) * 0.003 / (3000 * 0.01)
    assert spent > 0.025


def test_budget_measures_densely_where_b_simple_moves():
    """B_simple that doubles over the first 200 steps and then stays: the budget's burst goes there."""
    cadence = Cadence(budget=0.03)

    def band(step: int) -> tuple[float, float, float]:
        b = 100.0 * 2 ** min(step / 200, 1.0)
        return b, 0.98 * b, 1.02 * b

    measured, spent = _simulate(cadence, 6000, plain=0.01, cost=0.003, band=band)
    early, late = sum(measured[:200]), sum(measured[3000:3200])
    assert late == 20  # the steady cadence, 10
    assert early >= late + BURST / 2
    assert spent <= 0.03 + (BURST + DECIDE_EVERY) * 0.003 / (6000 * 0.01)


def test_budget_follows_rank_zero():
    calls = []

    def agree(value: int) -> int:
        calls.append(value)
        return 7

    follower = Cadence(budget=0.03, agree=agree, is_rank0=False)
    _simulate(follower, 40, plain=0.01, cost=0.003, band=lambda s: (1.0, 0.9, 1.1))
    assert calls[0] == WARMUP_EVERY and set(calls[1:]) == {7}  # it offers the cadence it has, never decides
    assert follower.every == 7


def test_budget_monitor_records_each_chosen_cadence():
    events = []

    class Keep(BaseSink):
        def on_event(self, event) -> None:
            events.append((event.step, dict(event.data or {})))

    torch.manual_seed(0)
    model = _Net()
    clock = [0.0]
    with ns.GNSMonitor(model, source="example", budget=0.05, sinks=[Keep()]) as monitor:
        monitor._cadence._clock = lambda: clock[0]
        statuses = []
        for ids, img, y in _batches(40):
            nn.functional.cross_entropy(model(ids, img), y).backward()
            clock[0] += 0.01 + (0.002 if monitor._armed else 0.0)  # a measurement costs 20% of a step
            statuses.append(monitor.step(batch_size=6).status)
            model.zero_grad()
        monitor.flush()
    assert events[0] == (1, {"every": WARMUP_EVERY})
    # 0.002 / (0.05 * 0.01) = 4 steady; a quarter of it while B_simple moves, twice it to pay back
    assert {e["every"] for _, e in events[1:]} <= {1, 4, 8} and len(events) >= 2
    # the recorded cadences reproduce the measured steps
    due, every, changes = 1, None, dict(events)
    for step, status in enumerate(statuses, start=1):
        every = changes[step]["every"] if step in changes else every
        assert (status != "unmeasured") == (step == due), step
        if step == due:
            due = step + every


def test_a_forward_pass_before_the_arming_step_call_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    monitor = ns.GNSMonitor(model, source="example", every=2)
    x = torch.randn(8, 4)
    model(x).square().mean().backward()
    monitor.step(batch_size=8)  # measured; step 2 is not
    model.zero_grad()
    model(x).square().mean().backward()
    early = model(x).square().mean()  # step 3's forward pass, before step 2's monitor.step()
    monitor.step(batch_size=8)
    model.zero_grad()
    early.backward()
    with pytest.raises(ns.StepError, match=r"Call monitor.step\(\) before the next step's first forward pass"):
        monitor.step(batch_size=8)
    monitor.close()


def test_a_measurement_read_from_two_threads_at_once():
    """The sinks' thread and the training loop (the budget reads the band) may read one measurement together."""
    import threading
    import time

    def slow_flags() -> tuple[int, int, int]:
        time.sleep(0.01)  # a device copy in flight
        return (0, 0, 0)

    for _ in range(5):
        m = ns.Measurement(
            table=lambda: [[2.0, 1.0, 3.0, 2.0, 1.0, 2.0, 1.0, 2.0]],
            flags=slow_flags,
            layer_names=(),
            module_names=(),
            step=1,
            examples=4,
            batch_size=4,
            source="example",
            coverage=1.0,
        )
        got: list[object] = []

        def read(m: ns.Measurement = m, got: list[object] = got) -> None:
            got.append((m.status, m.b_simple))

        threads = [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [("ok", 2.0), ("ok", 2.0)]


def test_budget_measures_a_few_times_per_half_life_and_says_when_that_binds():
    """Where the budget alone would measure very rarely (a measurement costs twice a plain step: one in 67 for 3%),
    the cadence stops at two measurements per smoothing half-life (here 60 examples: one in 5 steps of 6) and the
    cadence event says why."""
    events = []

    class Keep(BaseSink):
        def on_event(self, event) -> None:
            events.append((event.step, event.message, dict(event.data or {})))

    torch.manual_seed(0)
    model = _Net()
    clock = [0.0]
    measured = 0
    with ns.GNSMonitor(model, source="example", budget=0.03, halflife=60, sinks=[Keep()]) as monitor:
        monitor._cadence._clock = lambda: clock[0]
        for ids, img, y in _batches(60):
            nn.functional.cross_entropy(model(ids, img), y).backward()
            clock[0] += 0.001 + (0.002 if monitor._armed else 0.0)
            measured += monitor.step(batch_size=6).status != "unmeasured"
            model.zero_grad()
        monitor.flush()
    chosen = [e for e in events if e[2].get("every", 0) > WARMUP_EVERY]
    assert chosen and all(e[2]["every"] == 5 for e in chosen)
    assert all("half-life" in message for _, message, _ in chosen)
    assert measured >= 60 // 5
