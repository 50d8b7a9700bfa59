"""The planner's arithmetic against hand-computed cases and slow step-by-step references."""

import math

import pytest

from noisescale.errors import ConfigError
from noisescale.planning import Devices, Fixed, FollowNoise, LinearRamp, Piece, Replay, StepTime, predict, recover
from noisescale.planning.model import MAX_NOISE


def pieces_of(steps, batch, b_noise, n=10):
    """A run of ``steps`` steps of ``batch`` cut into ``n`` equal pieces, all at noise scale ``b_noise``."""
    return [recover(steps / n, steps / n * batch, b_noise) for _ in range(n)]


# -- recovery --------------------------------------------------------------------------------------------------


def test_recover_by_hand():
    # 300 steps of batch 64 with B_noise = 32: dS_min = 300 / (1 + 32/64) = 200, dE_min = 32 * 200 = 6400.
    p = recover(300, 300 * 64, 32.0)
    assert p.min_steps == pytest.approx(200.0) and p.min_examples == pytest.approx(6400.0)


def test_recover_at_the_ends_of_the_noise_scale():
    zero = recover(100, 6400, 0.0)  # no noise: every step was needed, no example was
    assert (zero.min_steps, zero.min_examples) == (100.0, 0.0)
    inf = recover(100, 6400, math.inf)  # all noise: the examples were needed, (almost) no step was
    assert inf.min_steps == pytest.approx(0.0, abs=1e-6) and inf.min_examples == pytest.approx(6400.0)
    assert recover(0, 0, 5.0) == Piece(0.0, 0.0, 5.0)


def test_recover_rejects_negative_input():
    with pytest.raises(ValueError, match=">= 0"):
        recover(10, 100, -1.0)


# -- constant B_noise: the closed form -------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4, 16, 64, 128, 1000, 10**6])
def test_constant_noise_gives_the_closed_form(batch):
    s_min, e_min, b_noise = 200.0, 6400.0, 32.0  # from 300 steps at batch 64 (test_recover_by_hand)
    o = predict(pieces_of(300, 64, b_noise), Fixed(batch))
    assert o.steps == pytest.approx(s_min * (1 + b_noise / batch), rel=1e-12)
    assert o.examples == pytest.approx(e_min * (1 + batch / b_noise), rel=1e-12)
    # the trade-off curve (S/S_min - 1)(E/E_min - 1) = 1
    assert (o.steps / s_min - 1) * (o.examples / e_min - 1) == pytest.approx(1.0, rel=1e-9)
    assert (o.batch_min, o.batch_max) == (batch, batch)


def test_constant_noise_by_hand():
    pieces = pieces_of(300, 64, 32.0)
    assert predict(pieces, Fixed(16)).steps == pytest.approx(600.0)  # 200 (1 + 32/16)
    assert predict(pieces, Fixed(16)).examples == pytest.approx(9600.0)  # 6400 (1 + 16/32)
    assert predict(pieces, Fixed(128)).steps == pytest.approx(250.0)
    assert predict(pieces, Fixed(128)).examples == pytest.approx(32000.0)
    assert predict(pieces, Fixed(64)).steps == pytest.approx(300.0)  # the run itself


@pytest.mark.parametrize("k", [0.25, 0.5, 1.0, 2.0, 8.0])
def test_following_the_noise_costs_one_plus_k(k):
    o = predict(pieces_of(300, 64, 32.0), FollowNoise(k))
    assert o.steps == pytest.approx(200.0 * (1 + 1 / k))
    assert o.examples == pytest.approx(6400.0 * (1 + k))


# -- piecewise-constant B_noise --------------------------------------------------------------------------------


def piecewise():
    # Stretch A: 100 steps of batch 10 at B_noise 10 -> dS_min 50, dE_min 500.
    # Stretch B: 100 steps of batch 10 at B_noise 90 -> dS_min 100 / (1 + 9) = 10, dE_min 900.
    return [*pieces_of(100, 10, 10.0, n=4), *pieces_of(100, 10, 90.0, n=5)]


def test_piecewise_noise_by_hand():
    pieces = piecewise()
    assert sum(p.min_steps for p in pieces) == pytest.approx(60.0)
    assert sum(p.min_examples for p in pieces) == pytest.approx(1400.0)
    o = predict(pieces, Fixed(30))  # A: 50 + 500/30, B: 10 + 900/30
    assert o.steps == pytest.approx(50 + 500 / 30 + 10 + 30)
    assert o.examples == pytest.approx(30 * (50 + 500 / 30 + 40))
    f = predict(pieces, FollowNoise(1.0))  # twice each stretch's minimum, batch 10 then 90
    assert (f.steps, f.examples) == (pytest.approx(120.0), pytest.approx(2800.0))
    assert (f.batch_min, f.batch_max) == (10.0, 90.0)
    c = predict(pieces, FollowNoise(1.0, min_batch=20, max_batch=60))  # clipped: 20 on A, 60 on B
    assert c.steps == pytest.approx(50 + 500 / 20 + 10 + 900 / 60)
    assert c.examples == pytest.approx(500 + 20 * 50 + 900 + 60 * 10)


def test_the_run_replayed_gives_back_the_run():
    # 40 steps of 8 then 30 steps of 32, with B_noise 20 then 100.
    ex, bs, total = [], [], 0
    for b in [8] * 40 + [32] * 30:
        total += b
        ex.append(total)
        bs.append(b)
    pieces = [recover(1, b, 20.0 if i < 40 else 100.0) for i, b in enumerate(bs)]
    o = predict(pieces, Replay(ex, bs))
    assert o.steps == pytest.approx(70.0, rel=1e-9) and o.examples == pytest.approx(total, rel=1e-9)


# -- a linear ramp ---------------------------------------------------------------------------------------------


def ramp_by_hand(s_min, e_min, b0, b1, e_ramp):
    """Steps and examples of ``b0 + (b1 - b0) E / e_ramp`` at constant B_noise, while the ramp has not ended.

    Along the progress p in [0, 1]: dE/dp = E_min + B S_min with B = b0 + c E (c = (b1 - b0) / e_ramp), so
    E(p) = (A / k)(exp(k p) - 1) with A = E_min + S_min b0, k = S_min c; and dS/dp = S_min + E_min / B(E(p)),
    where B(E(p)) = beta exp(k p) - B_noise with beta = B_noise + b0, which integrates to
    S = S_min + E_min / (k B_noise) * ln((beta - B_noise exp(-k)) / b0).
    """
    b_noise = e_min / s_min
    c = (b1 - b0) / e_ramp
    a, k = e_min + s_min * b0, s_min * c
    examples = a / k * math.expm1(k)
    beta = b_noise + b0
    steps = s_min + e_min / (k * b_noise) * math.log((beta - b_noise * math.exp(-k)) / b0)
    return steps, examples


def ramp_step_by_step(s_min, e_min, ramp):
    """Slow reference: whole steps, each at the ramp's batch for the examples seen so far, each moving progress
    by 1 / (S_min + E_min / B) (one step at batch B covers that fraction of a constant-noise run)."""
    p = steps = examples = 0.0
    while True:
        b = ramp.batch(steps=steps, examples=examples, b_noise=e_min / s_min)
        dp = 1.0 / (s_min + e_min / b)
        if p + dp >= 1.0:
            frac = (1.0 - p) / dp
            return steps + frac, examples + frac * b
        p, steps, examples = p + dp, steps + 1, examples + b


def test_linear_ramp_against_the_closed_form_and_a_step_by_step_reference():
    s_min, e_min = 200.0, 6400.0  # B_noise 32
    ramp = LinearRamp(4, 132, 40_000.0)  # ends past the examples needed: never flat
    pieces = pieces_of(300, 64, 32.0, n=50)
    o = predict(pieces, ramp)
    steps, examples = ramp_by_hand(s_min, e_min, 4, 132, 40_000.0)
    assert examples < 40_000
    assert o.steps == pytest.approx(steps, rel=5e-3)
    assert o.examples == pytest.approx(examples, rel=5e-3)
    ref_steps, ref_examples = ramp_step_by_step(s_min, e_min, ramp)
    assert o.steps == pytest.approx(ref_steps, rel=5e-3)
    assert o.examples == pytest.approx(ref_examples, rel=5e-3)
    assert o.batch_min == 4 and 4 < o.batch_max < 132


def test_a_flat_ramp_is_a_fixed_batch_and_a_finished_ramp_stays_at_its_end():
    pieces = pieces_of(300, 64, 32.0)
    flat = predict(pieces, LinearRamp(16, 16, 1000.0))
    assert flat.steps == pytest.approx(predict(pieces, Fixed(16)).steps)
    done = predict(pieces, LinearRamp(16, 128, 1e-3))  # 128 after its first step (of 16)
    assert done.steps == pytest.approx(predict(pieces, Fixed(128)).steps + 1 - (1 / 3 + 640 / 60 / 128), rel=1e-9)


def test_example_limited_ramp_by_hand():
    # B_noise unbounded: every stretch needs its examples, steps are E / B integrated: E_min / (b1 - b0) ln(b1/b0).
    pieces = [recover(10, 640, math.inf) for _ in range(20)]  # E_min = 12,800
    o = predict(pieces, LinearRamp(8, 72, 12_800.0))
    assert o.examples == pytest.approx(12_800.0, rel=1e-6)
    assert o.steps == pytest.approx(12_800.0 / 64 * math.log(72 / 8), rel=5e-3)


# -- devices and step time -------------------------------------------------------------------------------------


def test_step_time_fit_and_devices_by_hand():
    st = StepTime.fit([(32, 0.012), (256, 0.040)], devices=4, micro_batch=32)
    assert st.t0 == pytest.approx(0.008) and st.t1 == pytest.approx(0.000125)
    # a step of 256 on 4 devices: 64 examples each in 2 passes of 32 -> 2 * 0.008 + 0.000125 * 64
    assert st.passes(256) == 2 and st.passes(128) == 1 and st.passes(129) == 2
    assert st.seconds_per_step(256) == pytest.approx(2 * 0.008 + 0.000125 * 64)
    pieces = pieces_of(300, 64, 32.0)
    o = predict(pieces, Devices(4, 32, accumulation=2), step_time=st)
    assert o.steps == pytest.approx(200 * (1 + 32 / 256))
    assert o.time_s == pytest.approx(o.steps * st.seconds_per_step(256))
    assert predict(pieces, Fixed(16)).time_s is None


def test_step_time_fit_least_squares_and_refusals():
    st = StepTime.fit([(10, 1.0), (20, 2.1), (30, 2.9)])
    assert st.t1 == pytest.approx(0.095) and st.t0 == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(ConfigError, match="two different sizes"):
        StepTime.fit([(32, 0.01), (32, 0.02)])
    with pytest.raises(ConfigError, match="fall as the size grows"):
        StepTime.fit([(32, 0.02), (64, 0.01)])
    with pytest.raises(ConfigError, match="positive"):
        StepTime.fit([(32, 0.0), (64, 0.01)])
    with pytest.raises(ConfigError, match="devices"):
        StepTime(0.1, 0.01, devices=0)


def test_time_of_a_variable_schedule_sums_each_step():
    st = StepTime(t0=1.0, t1=0.5)
    pieces = piecewise()
    o = predict(pieces, FollowNoise(1.0), step_time=st)  # 100 steps of 10, then 20 steps of 90
    assert o.time_s == pytest.approx(100 * (1 + 5) + 20 * (1 + 45))


# -- bad schedules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Fixed(0), "batch_size must be a positive"),
        (lambda: Fixed(math.inf), "batch_size must be a positive"),
        (lambda: LinearRamp(8, 64, 0), "examples must be a positive"),
        (lambda: FollowNoise(-1), "k must be a positive"),
        (lambda: FollowNoise(1, min_batch=64, max_batch=32), "max_batch must be >= min_batch"),
        (lambda: Devices(2, 0), "micro_batch must be a positive integer"),
        (lambda: Replay([1, 2], [1]), "equal length"),
        (lambda: Replay([2, 1], [1, 1]), "non-decreasing"),
    ],
)
def test_bad_schedules_fail_at_construction(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_unbounded_noise_stays_finite():
    pieces = [recover(100, 6400, math.inf)]
    for sched in (Fixed(64), FollowNoise(1.0), FollowNoise(2.0, max_batch=512)):
        o = predict(pieces, sched)
        assert math.isfinite(o.steps) and math.isfinite(o.examples)
    assert predict(pieces, FollowNoise(2.0, max_batch=512)).steps == pytest.approx(6400 / 512, rel=1e-9)
    assert pieces[0].min_steps * MAX_NOISE == pytest.approx(6400.0, rel=1e-6)
