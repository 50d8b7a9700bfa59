"""Property test: on every step of any series, a defined B_simple lies inside its band, or the step says why not.

Random series of small- and big-batch sums go through the estimator on both paths (host floats, device
tensors) with random faults: non-finite values, all-zero rows, big batches whose norm is far below the small
ones' (|G|^2 estimates strongly negative), sudden jumps, batch-size changes, steps with too few small batches.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noisescale.estimators.band import z_for
from noisescale.estimators.engine import StepEngine
from noisescale.estimators.rows import RowLayout
from noisescale.estimators.smoothing import decay_for
from noisescale.estimators.step import StepConstants
from noisescale.stats import ParamSums
from noisescale.types import Measurement

PARAMS = ["a.weight", "a.bias", "b.weight"]

fault = st.sampled_from(["none", "none", "none", "nan", "inf", "zero", "tiny_big", "jump", "undefined", "negative"])
step = st.tuples(
    st.integers(min_value=2, max_value=256),  # batch size
    st.lists(st.floats(min_value=1e-6, max_value=1e3), min_size=3, max_size=3),  # per-example mean sq norm
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=3, max_size=3),  # signal fraction
    fault,
)


def _sums(batch: int, per_example: list[float], signal: list[float], kind: str) -> tuple[list[float], list[float]]:
    small = [batch * v for v in per_example]  # sum over B single-example batches of |g_i|^2
    big = [v * s + v / batch for v, s in zip(per_example, signal)]
    if kind == "nan":
        small[0] = float("nan")
    elif kind == "inf":
        big[1] = float("inf")
    elif kind == "zero":
        small[2] = big[2] = 0.0
    elif kind == "tiny_big":
        big = [v * 1e-9 for v in big]
    elif kind == "jump":
        small = [v * 1e4 for v in small]
    elif kind == "negative":
        big = [0.0 for _ in big]
    return small, big


def _measurement(
    engine: StepEngine, layout: RowLayout, i: int, small: ParamSums, big: ParamSums, c: StepConstants
) -> Measurement:
    out = engine.step(layout, small, big, c)
    return Measurement(
        table=out.table,
        flags=out.flags,
        layer_names=layout.layer_names,
        module_names=layout.module_names,
        step=i,
        examples=i * c.batch_size,
        batch_size=c.batch_size,
        source="example",
        coverage=1.0,
        undefined_reason=None if c.defined else "too few small batches",
    )


def _check(m: Measurement) -> None:
    rows = [m.total, *m.layers.values(), *m.modules.values()]
    if m.status == "ok":
        assert m.b_simple is not None
    for row in rows:
        if row.b_simple is None:
            continue
        assert row.b_simple_low is not None and row.b_simple_high is not None
        assert row.b_simple_low <= row.b_simple <= row.b_simple_high, row
    if m.status == "undefined":
        assert m.undefined_reason, "undefined without a reason"


@settings(max_examples=60, deadline=None)
@given(series=st.lists(step, min_size=1, max_size=40), path=st.sampled_from(["host", "device"]))
def test_the_band_holds_the_value_on_every_step(series, path):
    layout = RowLayout(PARAMS, per_layer=True)
    engine = StepEngine(z_for(0.9), path=path)
    for i, (batch, per_example, signal, kind) in enumerate(series, start=1):
        small, big = _sums(batch, per_example, signal, kind)
        defined = kind != "undefined"
        c = StepConstants(
            n_small=batch,
            inv_size_sum=float(batch),
            batch_size=batch,
            beta=decay_for(batch, 200.0),
            z=engine.z,
            defined=defined,
        )
        small_sums = ParamSums(small if path == "host" else torch.tensor(small, dtype=torch.float64))
        m = _measurement(engine, layout, i, small_sums, ParamSums(big), c)
        _check(m)


def test_a_significantly_negative_signal_is_undefined_with_the_reason():
    """Big-batch norms far below the small ones': |G|^2 is negative beyond its noise, B_simple has no value."""
    layout = RowLayout(PARAMS, per_layer=True)
    engine = StepEngine(z_for(0.9))
    m = None
    for i in range(1, 30):
        c = StepConstants(
            n_small=32, inv_size_sum=32.0, batch_size=32, beta=decay_for(32, 500.0), z=engine.z, defined=True
        )
        m = _measurement(engine, layout, i, ParamSums([32.0, 32.0, 32.0]), ParamSums([1e-6, 1e-6, 1e-6]), c)
        _check(m)
    assert m is not None and m.status == "undefined" and m.b_simple is None
    assert "negative beyond its own noise" in (m.undefined_reason or "")
    assert m.grad_sq is not None and m.grad_sq < 0  # the components stay: they are what the data say
