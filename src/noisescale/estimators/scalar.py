"""The per-step estimator maths on Python floats, one row at a time: the host path for CPU training.

On a CPU, a tiny tensor operation costs a few microseconds of dispatch, and smoothing plus the band take about a
hundred of them per step, as much as a small model's whole step.  For rows on the host, the same formulas as
``smoothing``, ``band`` and ``summary`` run here on plain floats (a few microseconds per row); accelerators keep
the vectorised tensor path, which never synchronises.  Both are checked against each other in the tests.

Formulas (per row; see ``smoothing`` and ``band`` for their derivation):

* two-batch: ``tr = (S/k - |G_B|^2) / (h - 1/B)``, ``|G|^2 = |G_B|^2 - tr / B`` (McCandlish et al. 2018, App. A);
* smoothing: ``S <- beta S + (1 - beta) x`` for ``x`` in ``1, g, t, g^2, t^2, g t`` and ``S2 <- beta^2 S2 +
  (1 - beta)^2``, only for a row used in this step;
* band: Fieller's interval from the smoothed means, their variance ``var * S2 / S1^2`` and covariance.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["RowState", "summarize_row", "update_row"]

_INF = float("inf")
_NAN = float("nan")


class RowState(NamedTuple):
    """Weighted sums of one row (total, a layer or a module); same meaning as the rows of ``EMAState.sums``.

    A named tuple: built once per row and step, and a tuple is the cheapest immutable record to build.
    """

    w: float = 0.0
    w2: float = 0.0
    g: float = 0.0
    t: float = 0.0
    gg: float = 0.0
    tt: float = 0.0
    gt: float = 0.0
    n: float = 0.0


def update_row(state: RowState, grad_sq: float, trace_cov: float, beta: float) -> RowState:
    """Fold one step's raw estimates of a used row into its weighted sums (bias-corrected EMA)."""
    a = 1.0 - beta
    return RowState(
        w=beta * state.w + a,
        w2=beta * beta * state.w2 + a * a,
        g=beta * state.g + a * grad_sq,
        t=beta * state.t + a * trace_cov,
        gg=beta * state.gg + a * grad_sq * grad_sq,
        tt=beta * state.tt + a * trace_cov * trace_cov,
        gt=beta * state.gt + a * grad_sq * trace_cov,
        n=state.n + 1.0,
    )


def summarize_row(state: RowState, grad_sq_raw: float, trace_cov_raw: float, used: bool, z: float) -> list[float]:
    """The eight ``COLUMNS`` of one row: smoothed B_simple, its band, the raw ratio, smoothed and raw components."""
    finite = math.isfinite(grad_sq_raw) and math.isfinite(trace_cov_raw)
    b_raw = trace_cov_raw / grad_sq_raw if used and grad_sq_raw > 0 else _NAN
    raw = [grad_sq_raw, trace_cov_raw] if finite else [_NAN, _NAN]
    if state.w == 0.0:  # never updated: nothing is defined yet
        return [_NAN, _NAN, _NAN, b_raw, _NAN, _NAN, *raw]
    g, t = state.g / state.w, state.t / state.w
    frac = state.w2 / (state.w * state.w)  # 1 / n_eff
    if frac < 1.0 - 1e-12:
        scale = frac / (1.0 - frac)
        var_g = max((state.gg / state.w - g * g) * scale, 0.0)
        var_t = max((state.tt / state.w - t * t) * scale, 0.0)
        cov = (state.gt / state.w - g * t) * scale
    else:
        var_g = var_t = _INF
        cov = 0.0
    if g == 0.0:
        return [_NAN, _NAN, _NAN, b_raw, g, t, *raw]
    ratio = t / g
    b_simple = _INF if ratio < 0 else ratio
    low, high = _fieller(t, g, var_t, var_g, cov, z)
    return [b_simple, low, high, b_raw, g, t, *raw]


def _fieller(t: float, g: float, var_t: float, var_g: float, cov: float, z: float) -> tuple[float, float]:
    z2 = z * z
    a = g * g - z2 * var_g
    b = t * g - z2 * cov
    d = t * t - z2 * var_t
    disc = b * b - a * d
    if not (a > 0 and 0 <= disc < _INF):
        return 0.0, _INF
    root = math.sqrt(disc)
    return max((b - root) / a, 0.0), (b + root) / a
