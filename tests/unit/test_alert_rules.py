"""Built-in alert rules and the engine on scripted series: which alert fires, at which step, with which events."""

import math

import pytest

import noisescale as ns
from noisescale.alerts import (
    AlertEngine,
    CallbackChannel,
    Check,
    LayerBand,
    Observation,
    Rule,
    batch_above_noise,
    batch_below_noise,
    builtin_rules,
    grad_sq_unreliable,
    layer_outlier,
    loss_stalled,
    noise_jump,
    nonfinite_steps,
)


def obs(step, b=100.0, low=None, high=None, *, batch=32, status="ok", skipped=0, raw=None, metrics=None, **kw):
    low = b * 0.9 if low is None and b is not None else low
    high = b * 1.1 if high is None and b is not None else high
    values = {
        "b_simple": b,
        "b_simple_low": low,
        "b_simple_high": high,
        "b_simple_raw": b,
        "grad_sq": 1.0,
        "trace_cov": b,
        "grad_sq_raw": raw,
        "trace_cov_raw": None,
    }
    return Observation(
        step=step,
        examples=step * batch,
        batch_size=batch,
        status=status,
        skipped_steps=skipped,
        values=values,
        metrics=metrics or {},
        **kw,
    )


def run(engine, observations):
    """Evaluate each observation; returns the events as (step, state, layer, notified)."""
    out = []
    for o in observations:
        for e in engine.evaluate(o, wall_time=float(o.step)):
            assert e.kind == "alert"
            out.append((e.step, e.data["state"], e.data["layer"], e.data["notified"]))
    return out


def quiet(rules, **kw):
    return AlertEngine(rules, channels=[], **kw)


def test_batch_far_below_b_simple_fires_after_the_hold_and_resolves_after_the_clear():
    rule = batch_below_noise(factor=10, hold_for=5, clear_for=3, warmup=0)
    # B_simple 1000 (band 900..1100) with batch 32: 900 >= 320 -> active; then batch 256: 900 < 2560 -> clear
    series = [obs(s, 1000.0, batch=32) for s in range(1, 11)] + [obs(s, 1000.0, batch=256) for s in range(11, 16)]
    assert run(quiet([rule]), series) == [
        (1, "pending", None, True),
        (6, "firing", None, True),
        (14, "resolved", None, True),
    ]


def test_batch_below_waits_for_the_whole_band():
    rule = batch_below_noise(factor=10, hold_for=0, warmup=0)
    engine = quiet([rule])
    # value 1000 but band down to 100: cannot tell the batch is far below -> nothing
    assert run(engine, [obs(s, 1000.0, low=100.0, high=5000.0) for s in range(1, 5)]) == []


def test_batch_far_above_b_simple():
    rule = batch_above_noise(factor=10, hold_for=2, clear_for=0, warmup=0)
    series = [obs(s, 10.0, batch=512) for s in range(1, 5)] + [obs(5, 100.0, batch=512)]
    events = run(quiet([rule]), series)
    assert events == [(1, "pending", None, True), (3, "firing", None, True), (5, "resolved", None, True)]
    check = rule.check(_history(series[:1]))
    assert check.active and math.isclose(check.value, 51.2)


def test_warmup_skips_the_first_steps():
    rule = batch_below_noise(factor=10, hold_for=0, warmup=5)
    events = run(quiet([rule]), [obs(s, 1000.0) for s in range(1, 8)])
    assert events == [(5, "firing", None, True)]


def test_noise_jump_of_the_whole_model_and_of_one_layer():
    rule = noise_jump(factor=3, over=5, clear_for=4, warmup=0)
    steady = {"enc.weight": LayerBand(50.0, 45.0, 55.0), "dec.weight": LayerBand(80.0, 70.0, 90.0)}
    moved = {"enc.weight": LayerBand(400.0, 350.0, 450.0), "dec.weight": LayerBand(80.0, 70.0, 90.0)}
    series = [obs(s, 100.0, layers=steady) for s in range(1, 11)]
    series += [obs(s, 100.0, layers=moved) for s in range(11, 21)]  # one layer jumps x8, the model does not
    series += [obs(s, 1000.0, layers=moved) for s in range(21, 31)]  # then the model jumps x10
    events = run(quiet([rule]), series)
    assert events == [
        (11, "firing", "enc.weight", True),  # 5 steps after step 6 (50) it is 400
        (20, "resolved", "enc.weight", True),  # from 16 on it compares with the new values: clear for 4 steps
        (21, "firing", None, True),
        (30, "resolved", None, True),
    ]


def test_noise_jump_needs_separate_bands():
    rule = noise_jump(factor=3, over=2, warmup=0, layers=False)
    series = [obs(1, 100.0, 10.0, 1000.0), obs(2, 100.0, 10.0, 1000.0), obs(3, 500.0, 50.0, 5000.0)]
    assert run(quiet([rule]), series) == []


def test_grad_sq_non_positive_too_often():
    # (the default band of obs() is [0.9 b, 1.1 b]: the band test is switched off here, tested below)
    rule = grad_sq_unreliable(
        fraction=0.45, window=10, min_count=10, band_ratio=None, hold_for=2, clear_for=5, warmup=0
    )
    # steps 1-20: every 4th |G|^2 non-positive (2-3 in any 10 steps); 21-40: every odd one (5 in 10); then none
    series = [obs(s, raw=-1.0 if s % 4 == 0 else 1.0) for s in range(1, 21)]
    series += [obs(s, raw=-1.0 if s % 2 else 1.0) for s in range(21, 41)]
    series += [obs(s, raw=1.0) for s in range(41, 61)]
    events = run(quiet([rule]), series)
    assert events == [
        (25, "pending", None, True),  # steps 16-25: 16, 20, 21, 23, 25 -> 5 of 10
        (27, "pending", None, True),  # step 26 had 4 of 10: the pending alert gave up, silently
        (29, "firing", None, True),  # held 2 steps
        (46, "resolved", None, True),  # 4 of 10 at step 41, clear for 5 steps
    ]
    # undefined raw values are not counted
    assert rule.check(_history([obs(s, raw=None) for s in range(1, 30)])) is None
    # half of them negative, but the smoothed band is tight (x1.5 < x4): the smoothing copes, nothing fires
    rule = grad_sq_unreliable(window=10, warmup=0)
    tight = [obs(s, 100.0, 80.0, 120.0, raw=-1.0 if s % 2 else 1.0) for s in range(1, 30)]
    assert not rule.check(_history(tight)).active
    unbounded = [obs(s, 100.0, 0.0, float("inf"), raw=-1.0 if s % 2 else 1.0) for s in range(1, 30)]
    assert rule.check(_history(unbounded)).active


def test_loss_stalled_while_the_noise_is_low():
    rule = loss_stalled(window=20, min_improvement=0.01, min_count=5, warmup=0)
    falling = [obs(s, 10.0, batch=64, metrics={"loss": 5.0 - 0.1 * s}) for s in range(1, 31)]
    flat = [obs(s, 10.0, batch=64, metrics={"loss": 2.0 + 0.001 * (s % 2)}) for s in range(31, 61)]
    events = run(quiet([rule]), falling + flat)
    # at 48 the earlier half (steps 29-38) has only two falling values left: it improved by 0.5% < 1%
    assert events == [(48, "firing", None, True)]
    # the same flat loss with a noise scale above the batch: exploring still pays, nothing fires
    noisy = [obs(o.step, 500.0, batch=64, metrics=o.metrics) for o in falling + flat]
    assert run(quiet([loss_stalled(window=20, warmup=0)]), noisy) == []
    # a loss that rises is no plateau
    rising = [obs(o.step, 10.0, batch=64, metrics={"loss": 1.0 + 0.1 * o.step}) for o in falling + flat]
    assert run(quiet([loss_stalled(window=20, warmup=0)]), rising) == []
    # no loss logged: the rule cannot tell
    assert run(quiet([loss_stalled(window=20, warmup=0)]), [obs(s, 10.0, batch=64) for s in range(1, 60)]) == []


def test_nonfinite_steps_piling_up():
    rule = nonfinite_steps(count=3, window=10, clear_for=5)
    skipped = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    series = [obs(s, skipped=k, status="skipped" if s in (3, 5, 7) else "ok") for s, k in enumerate(skipped, 1)]
    events = run(quiet([rule]), series)
    # the third skipped step (7) fires; at 13 the last 10 steps hold only two (5 and 7): clear for 5 steps
    assert events == [(7, "firing", None, True), (18, "resolved", None, True)]


def test_one_layer_far_from_the_others():
    rule = layer_outlier(factor=30, hold_for=2, clear_for=0, warmup=0)
    normal = {f"l{i}": LayerBand(100.0 * (i + 1), 90.0 * (i + 1), 110.0 * (i + 1)) for i in range(4)}
    odd = dict(normal, l2=LayerBand(30000.0, 20000.0, 40000.0))
    series = (
        [obs(s, modules=normal) for s in (1, 2)] + [obs(s, modules=odd) for s in (3, 4, 5)] + [obs(6, modules=normal)]
    )
    events = run(quiet([rule]), series)
    assert events == [(3, "pending", "l2", True), (5, "firing", "l2", True), (6, "resolved", "l2", True)]
    assert run(quiet([layer_outlier(warmup=0)]), [obs(1, modules=dict(list(normal.items())[:2]))]) == []


def test_a_custom_rule_in_a_few_lines_with_channels_and_notify_states():
    def loss_too_high(history):
        loss = history.latest.get("loss")
        return None if loss is None else Check(loss > 5.0, value=loss)

    rule = Rule(
        name="loss_high",
        check=loss_too_high,
        summary="the training loss is above 5",
        action="lower the learning rate",
        hold_for=2,
        cooldown=10,
    )
    got = []
    engine = AlertEngine([rule], channels=[CallbackChannel(got.append)])
    losses = [1, 6, 7, 8, 1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 1]
    series = [obs(s, metrics={"loss": float(v)}) for s, v in enumerate(losses, 1)]
    events = run(engine, series)
    assert events == [
        (2, "pending", None, True),
        (4, "firing", None, True),
        (5, "resolved", None, True),
        (6, "pending", None, True),
        (8, "firing", None, False),  # within the 10-step cooldown of the firing at 4: recorded, not notified
        (16, "resolved", None, True),
    ]
    # notified (firing and resolved only by default): firing at 4, resolved at 5, the late firing at 14, resolved
    assert [(a.step, a.state, a.value) for a in got] == [
        (4, "firing", 8.0),
        (5, "resolved", 8.0),
        (14, "firing", 9.0),
        (16, "resolved", 9.0),
    ]
    assert got[0].message == "the training loss is above 5" and got[0].action == "lower the learning rate"
    assert "Suggested action: lower the learning rate" in got[0].text()


def test_notify_states_and_other_ranks():
    rule = batch_below_noise(hold_for=1, clear_for=0, warmup=0)
    got = []
    engine = AlertEngine([rule], channels=[CallbackChannel(got.append)], notify_states=("pending", "firing"))
    run(engine, [obs(s, 1000.0) for s in (1, 2)] + [obs(3, 10.0)])
    assert [a.state for a in got] == ["pending", "firing"]
    other = []
    engine = AlertEngine([rule], channels=[CallbackChannel(other.append)], rank=1)
    assert len(run(engine, [obs(s, 1000.0) for s in (1, 2)])) == 2  # the same events on every rank ...
    assert other == []  # ... but only rank 0 notifies


def test_engine_state_dict_continues_identically():
    rules = [
        batch_below_noise(hold_for=3, clear_for=2, warmup=0),
        noise_jump(over=3, warmup=0),
        loss_stalled(window=10, warmup=0),
    ]
    layers = {"a": LayerBand(10.0, 9.0, 11.0), "b": LayerBand(20.0, 18.0, 22.0)}
    series = []
    for s in range(1, 41):
        b = 1000.0 if (s // 7) % 2 else 30.0
        series.append(obs(s, b, layers=layers, metrics={"loss": 1.0 + (0.0 if s > 20 else 1.0 / s)}))
    straight = run(quiet(rules), series)
    first = quiet(rules)
    head = run(first, series[:17])
    resumed = quiet(rules)
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed, series[17:]) == straight
    assert len(straight) >= 6


def test_bad_rules_fail_at_construction():
    def ok(history):
        return None

    with pytest.raises(ns.ConfigError, match="rule name"):
        Rule(name="has space", check=ok, summary="s", action="a")
    with pytest.raises(ns.ConfigError, match="hold_for must be a non-negative number of steps, got -1"):
        Rule(name="r", check=ok, summary="s", action="a", hold_for=-1)
    with pytest.raises(ns.ConfigError, match="severity"):
        Rule(name="r", check=ok, summary="s", action="a", severity="loud")
    with pytest.raises(ns.ConfigError, match="repeat_every"):
        Rule(name="r", check=ok, summary="s", action="a", repeat_every=0)
    with pytest.raises(ns.ConfigError, match="action"):
        Rule(name="r", check=ok, summary="s", action="")
    with pytest.raises(ns.ConfigError, match="more than once"):
        AlertEngine([batch_below_noise(), batch_below_noise()])
    with pytest.raises(ns.ConfigError, match="notify_states"):
        AlertEngine([], notify_states=("loud",))
    with pytest.raises(ns.ConfigError, match="factor"):
        batch_below_noise(factor=0.5)


def test_every_builtin_rule_has_an_action_and_default_rules_is_a_sink():
    from noisescale.sink import is_sink

    rules = builtin_rules()
    assert len({r.name for r in rules}) == 7
    assert all(r.action and r.summary for r in rules)
    engine = ns.alerts.default_rules()
    assert is_sink(engine) and [r.name for r in engine.rules] == [r.name for r in rules]


def _history(observations):
    from noisescale.alerts import History

    return History(observations)


def test_a_broken_rule_warns_once_and_the_others_go_on():
    def broken(history):
        raise ZeroDivisionError("oops")

    bad = Rule(name="broken", check=broken, summary="s", action="a")
    engine = quiet([bad, batch_below_noise(hold_for=0, warmup=0)])
    with pytest.warns(RuntimeWarning, match="'broken' raised ZeroDivisionError") as caught:
        events = run(engine, [obs(s, 1000.0) for s in (1, 2, 3)])
    assert len([w for w in caught if "broken" in str(w.message)]) == 1
    assert events == [(1, "firing", None, True)] and engine.rule_errors == {"broken": 3}
