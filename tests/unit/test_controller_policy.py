"""The pure controller: scripted measurement series in, exactly the expected decisions out."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest

from noisescale.controllers import ControllerConfig, ControllerState, ExampleClock, Stall, lr_scale
from noisescale.errors import ConfigError


@dataclass
class M:
    """A measurement stand-in: only the plain attributes the controller reads."""

    step: int
    examples: int
    b_simple: float | None
    b_simple_low: float | None = None
    b_simple_high: float | None = None
    batch_size: int = 0
    status: str = "ok"


def run(config: ControllerConfig, series, losses=None):
    """Feed ``series`` of ``(b, low, high)`` (or ``None`` for an undefined step), each step at the current batch;
    returns the decisions."""
    state = config.init()
    out, examples = [], 0
    for i, point in enumerate(series):
        examples += state.batch_size
        if point is None:
            m = M(i + 1, examples, None, status="undefined", batch_size=state.batch_size)
        else:
            b, lo, hi = point if isinstance(point, tuple) else (point, point, point)
            m = M(i + 1, examples, b, lo, hi, batch_size=state.batch_size)
        d, state = config.update(m, state, loss=None if losses is None else losses[i])
        out.append(d)
    return out, state


def gns(**kw) -> ControllerConfig:
    base = {"policy": "gns", "min_batch": 16, "max_batch": 512, "batch_size": 32, "hysteresis": 0.25}
    return ControllerConfig(**{**base, **kw})


# -- gns: hysteresis, band, dwell, bounds, factor, quantisation, monotonic -------------------------------------------


def test_hysteresis_band_around_the_batch():
    # batch 32, hysteresis 25%: raise only when k x low > 40, lower only when k x high < 25.6
    decisions, _ = run(gns(use_band=False), [39.9, 40.0, 26.0, 25.7, 41.0])
    assert [d.batch_size for d in decisions] == [32, 32, 32, 32, 41]  # any multiple of 1 from 16 to 512
    assert [d.changed for d in decisions] == [False, False, False, False, True]


def test_exact_decisions_over_a_scripted_series():
    # B_simple grows from 20 to 300 with a band of +-20%; multiples of 16, dwell 256 examples, x2 at most.
    cfg = gns(dwell=256)
    series = [(b, 0.8 * b, 1.2 * b) for b in (20, 30, 60, 60, 60, 60, 60, 100, 100, 100, 300, 300, 300)]
    decisions, state = run(cfg, series)
    got = [(d.step, d.examples, d.batch_size) for d in decisions if d.changed]
    # step 1: the high edge 24 < 32 / 1.25 asks for 20, but only 32 of the 256 examples of the dwell have passed;
    # step 3: the low edge 48 > 40 asks for 60: waits for the dwell until step 8 (256 examples), where the target
    # is 100, bounded to 64 by the factor 2; at 64 the low edge 80 does not clear 80; step 11 (448 examples)
    # asks for min(300, 128) but the dwell runs from 256 to 512: step 12; step 13 waits again.
    assert got == [(8, 256, 64), (12, 512, 128)]
    assert [d.reason.split(":")[0] for d in decisions[:3]] == ["held at 32"] * 3
    assert "dwell" in decisions[0].reason and "hysteresis" in decisions[1].reason
    assert state.changes == 2 and state.changed_at == 512 and state.batch_size == 128
    assert all(d.batch_before == (32 if d.step <= 8 else 64 if d.step <= 12 else 128) for d in decisions)


def test_dwell_counts_examples_not_steps():
    cfg = gns(dwell=100, use_band=False)
    decisions, _ = run(cfg, [1000.0] * 6)
    # examples 32, 64, 96, 128: the first change at 128; then 192 (64 since), 256 (128 since): the second
    assert [d.batch_size for d in decisions] == [32, 32, 32, 64, 64, 128]


def test_bounded_factor_and_bounds():
    cfg = gns(use_band=False, max_factor=2.0)
    decisions, _ = run(cfg, [5000.0] * 6)
    assert [d.batch_size for d in decisions] == [64, 128, 256, 512, 512, 512]  # x2 per change, then max_batch
    decisions, _ = run(gns(use_band=False, max_factor=4.0), [5000.0] * 3)
    assert [d.batch_size for d in decisions] == [128, 512, 512]
    decisions, _ = run(gns(use_band=False, batch_size=512), [1.0] * 6)
    assert [d.batch_size for d in decisions] == [256, 128, 64, 32, 16, 16]  # /2 per change, then min_batch


def test_quantised_to_micro_batch_times_world_size():
    cfg = ControllerConfig(
        policy="gns", min_batch=24, max_batch=480, micro_batch=12, world_size=2, use_band=False, max_factor=8.0
    )
    decisions, _ = run(cfg, [50.0, 140.0, 140.0])
    assert [d.batch_size for d in decisions] == [48, 144, 144]  # nearest multiples of 24 of 50 and 140
    assert [d.accumulation for d in decisions] == [2, 6, 6]  # 48 / (12 x 2), 144 / 24


def test_quantised_to_powers_of_two():
    cfg = gns(quantize="pow2", use_band=False, max_factor=8.0)
    decisions, _ = run(cfg, [90.0, 90.0, 200.0, 40.0])
    # 90: log2 = 6.49 -> 64; at 64, 90 < 80? no: 90 > 80 -> nearest is still 64 (no change); 200 -> 256;
    # 40 < 256 / 1.25 -> nearest 32
    assert [d.batch_size for d in decisions] == [64, 64, 256, 32]


def test_monotonic_never_lowers():
    decisions, _ = run(gns(use_band=False, monotonic=True, quantize="pow2"), [100.0, 100.0, 5.0, 5.0, 300.0])
    assert [d.batch_size for d in decisions] == [64, 128, 128, 128, 256]


def test_power_grows_the_target_with_the_square_root():
    cfg = gns(use_band=False, power=0.5, base_batch=32, max_factor=8.0)
    decisions, _ = run(cfg, [128.0, 512.0, 512.0, 32.0])
    # sqrt(128 x 32) = 64, sqrt(512 x 32) = 128, then kept; sqrt(32 x 32) = 32
    assert [d.batch_size for d in decisions] == [64, 128, 128, 32]
    assert cfg.target(2048.0) == pytest.approx(256.0)
    with pytest.raises(ConfigError, match="power must be in"):
        gns(power=2.0)


def test_band_keeps_a_noisy_estimate_from_flapping():
    # A point that jumps around 32 with a wide band: the band never clears the hysteresis, the point does.
    series = [(b, b / 3, b * 3) for b in (60, 15, 70, 12, 65, 14)]
    with_band, _ = run(gns(), series)
    assert {d.batch_size for d in with_band} == {32}
    without, _ = run(gns(use_band=False), series)
    assert sum(d.changed for d in without) >= 4


def test_an_unbounded_band_never_moves_the_batch():
    decisions, _ = run(gns(), [(100.0, 0.0, math.inf)] * 3 + [(1.0, 0.0, math.inf)] * 3)
    assert all(d.batch_size == 32 and not d.changed for d in decisions)


# -- undefined and skipped measurements -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["undefined", "skipped"])
def test_undefined_or_skipped_never_changes_anything(status):
    cfg = gns(use_band=False, lr_rule="adascale")
    state = cfg.init()
    d, state = cfg.update(M(1, 32, 100.0), state)
    assert d.batch_size == 64
    for i in range(2, 6):
        m = M(i, 32 + 64 * (i - 1), 5000.0, 4000.0, 6000.0, status=status)  # its numbers must not be read as a signal
        d2, state2 = cfg.update(m, state)
        assert state2 is state
        assert (d2.batch_size, d2.changed, d2.lr_scale) == (64, False, d.next_lr_scale)
        assert status in d2.reason
    d3, state3 = cfg.update(M(6, 500, None), state)  # status ok, but no value: also held
    assert state3 is state and not d3.changed and "no finite" in d3.reason


# -- learning-rate rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "before", "after"),
    [
        ("none", 1.0, 1.0),
        ("linear", 1.0, 2.0),
        ("sqrt", 1.0, math.sqrt(2)),
        ("adascale", 1.0, (1 + 100 / 32) / (1 + 100 / 64)),
    ],
)
def test_lr_scale_is_for_the_measured_gradient_and_next_for_the_new_batch(rule, before, after):
    cfg = gns(use_band=False, lr_rule=rule)
    decisions, _ = run(cfg, [100.0, 100.0])
    d1, d2 = decisions
    assert (d1.batch_before, d1.batch_size) == (32, 64)
    assert d1.lr_scale == pytest.approx(before)  # the step just measured ran at 32, the base batch
    assert d1.next_lr_scale == pytest.approx(after)
    assert d2.batch_before == 64 and d2.lr_scale == pytest.approx(after)


def test_adascale_gain_follows_the_measured_noise_scale():
    cfg = gns(use_band=False, lr_rule="adascale", batch_size=32, min_batch=32, max_batch=32, base_batch=16)
    decisions, _ = run(cfg, [16.0, 1e9, 0.0])
    assert [d.batch_size for d in decisions] == [32, 32, 32]  # min = max: never moves
    assert decisions[0].lr_scale == pytest.approx((1 + 1) / (1 + 0.5))
    assert decisions[1].lr_scale == pytest.approx(2.0, rel=1e-6)  # all noise: the linear rule's B / B0
    assert decisions[2].lr_scale == 1.0  # no noise: a larger batch buys nothing
    assert lr_scale("adascale", 32, 16, math.inf) == 2.0 and lr_scale("adascale", 32, 16, None) == 1.0


# -- fixed schedules ------------------------------------------------------------------------------------------------


def _clocked(cfg, steps):
    clock, state, out = ExampleClock(), cfg.init(), []
    for _ in range(steps):
        clock.tick(state.batch_size)
        d, state = cfg.update(clock, state)
        out.append(d.batch_size)
    return out


def test_constant_step_and_linear_ramp_schedules_by_examples():
    assert _clocked(ControllerConfig(policy="constant", batch_size=48), 4) == [48] * 4
    step = ControllerConfig(policy="step", batch_size=16, milestones=((64, 32), (160, 64)))
    # examples after each step: 16 32 48 64 | 96 128 160 | 224 ...
    assert _clocked(step, 9) == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    ramp = ControllerConfig(policy="linear_ramp", batch_size=16, ramp_to=64, ramp_examples=256, min_batch=16)
    got = _clocked(ramp, 10)
    # nearest multiple of 1 of 16 + 48 x min(1, e / 256) at e = 16, 33, 52, ...
    e, want, b = 0, [], 16
    for _ in range(10):
        e += b
        b = round(16 + 48 * min(1.0, e / 256))
        want.append(b)
    assert got == want and got[-1] == 64
    pow2 = ControllerConfig(policy="linear_ramp", batch_size=16, ramp_to=128, ramp_examples=1000, quantize="pow2")
    assert set(_clocked(pow2, 30)) <= {16, 32, 64, 128}


# -- stall response -------------------------------------------------------------------------------------------------


def test_stall_lowers_the_batch_for_a_bounded_time_then_returns():
    stall = Stall(patience=128, duration=96, factor=2.0, min_improvement=0.01, max_responses=1)
    cfg = gns(hysteresis=100.0, stall=stall)  # hysteresis 100: the gns target never moves it
    losses = [1.0, 0.5] + [0.499] * 18  # 0.499 is less than a 1% gain on 0.5
    decisions, state = run(cfg, [(10.0, 8.0, 12.0)] * len(losses), losses)  # noise 10 <= batch: low
    got = [(d.step, d.examples, d.batch_size, d.stall) for d in decisions if d.changed]
    # best 0.5 at 64 examples; no 1% gain since; 64 + 128 = 192 examples at step 6 -> batch 16 until 288;
    # steps 7.. at 16 each: 208, 224, 240, 256, 272, 288 -> back to 32 at step 12; from there the patience runs
    # out again at 416 examples (step 16), but max_responses=1
    assert got == [(6, 192, 16, "started"), (12, 288, 32, "ended")]
    assert [d.stall for d in decisions[6:11]] == ["active"] * 5
    assert state.stalls == 1 and state.stall_until is None and state.batch_size == 32


def test_stall_waits_for_low_noise_and_can_raise_the_learning_rate():
    stall = Stall(patience=64, duration=64, action="raise_lr", factor=3.0, noise_below=1.0)
    cfg = gns(hysteresis=100.0, stall=stall, lr_rule="linear")
    flat = [1.0] * 6
    high_noise, _ = run(cfg, [(100.0, 90.0, 110.0)] * 6, flat)  # B_simple 100 > batch 32: not low
    assert not any(d.changed for d in high_noise)
    low, _ = run(cfg, [(10.0, 9.0, 11.0)] * 6, flat)
    # best at step 1 (32); 32 + 64 = 96: step 3 starts; until 160 = step 5 ends
    assert [(d.step, d.stall) for d in low if d.changed] == [(3, "started"), (5, "ended")]
    assert [d.lr_scale for d in low[:6]] == [1.0, 1.0, 1.0, 3.0, 3.0, 1.0]
    assert low[2].next_lr_scale == 3.0 and low[4].next_lr_scale == 1.0
    assert all(d.batch_size == 32 for d in low)


def test_stall_needs_the_loss():
    cfg = gns(stall=Stall(patience=10, duration=10))
    with pytest.raises(ConfigError, match="loss=loss"):
        cfg.update(M(1, 32, 10.0), cfg.init())


# -- state ----------------------------------------------------------------------------------------------------------


def test_state_is_frozen_versioned_and_round_trips():
    _, state = run(gns(dwell=64), [(100.0, 80.0, 120.0)] * 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.batch_size = 1  # type: ignore[misc]
    d = state.to_dict()
    assert d["version"] == 1 and ControllerState.from_dict(d) == state
    with pytest.raises(ConfigError, match="version"):
        ControllerState.from_dict({**d, "version": 99})
    with pytest.raises(ConfigError, match="unknown fields"):
        ControllerState.from_dict({**d, "bogus": 1})


# -- bad configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_batch": 256, "max_batch": 64}, "min_batch must be <= max_batch.*swap"),
        ({"min_batch": 24, "max_batch": 512, "micro_batch": 24, "quantize": "pow2"}, "power-of-two micro_batch"),
        ({"min_batch": 30, "max_batch": 480, "micro_batch": 8}, "use min_batch=32"),
        ({"min_batch": 16, "max_batch": 500, "quantize": "pow2"}, "use max_batch=512"),
        ({"min_batch": 16, "max_batch": 512, "batch_size": 40, "quantize": "pow2"}, "use batch_size=32"),
        ({"min_batch": 16, "max_batch": 512, "lr_rule": "cubic"}, "unknown lr_rule 'cubic'"),
        ({"policy": "adaptive", "max_batch": 512}, "unknown policy"),
        ({"min_batch": 16}, "needs max_batch"),
        ({"min_batch": 16, "max_batch": 512, "quantize": "pow2", "max_factor": 1.5}, "use max_factor=2"),
        ({"min_batch": 16, "max_batch": 512, "k": 0.0}, "k must be"),
        ({"min_batch": 16, "max_batch": 512, "dwell": -1}, "dwell"),
        ({"min_batch": 16, "max_batch": 512, "signal": "b simple"}, "signal must name"),
        ({"policy": "step", "batch_size": 32}, "needs milestones"),
        ({"policy": "step", "batch_size": 32, "milestones": ((100, 64), (50, 128))}, "increasing order"),
        ({"policy": "linear_ramp", "batch_size": 32, "ramp_to": 256}, "ramp_examples"),
        ({"policy": "constant"}, "needs batch_size"),
        ({"policy": "constant", "batch_size": 32, "ramp_to": 64}, "are for policy='linear_ramp'"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ControllerConfig(**kwargs)


def test_a_signal_the_measurement_lacks_is_named():
    cfg = gns(signal="b_precond")
    with pytest.raises(ConfigError, match="b_precond"):
        cfg.update(M(1, 32, 10.0), cfg.init())


def test_another_signal_is_read_with_its_own_band():
    @dataclass
    class Pre(M):
        b_precond: float | None = None
        b_precond_low: float | None = None
        b_precond_high: float | None = None

    cfg = gns(signal="b_precond")
    d, _ = cfg.update(Pre(1, 32, 1.0, 1.0, 1.0, b_precond=100.0, b_precond_low=90.0, b_precond_high=110.0), cfg.init())
    assert d.batch_size == 64 and d.signal == 100.0 and "b_precond" in d.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patience": 0, "duration": 10},
        {"patience": 10, "duration": 10, "factor": 1.0},
        {"patience": 10, "duration": 10, "action": "panic"},
    ],
)
def test_bad_stall_configuration(kwargs):
    with pytest.raises(ConfigError):
        Stall(**kwargs)
