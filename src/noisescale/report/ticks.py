"""Tick values and labels for the report's axes: round numbers on linear axes, 1-2-5 or decades on log axes.

A log axis always gets at least three labelled ticks: over a narrow range (less than a factor of ten, say 36 to
120) the 1-2-5 values alone would leave one or two ticks, so finer mantissas are tried (1-2-3-5, then 1 to 9),
and over a very narrow one (1.5 to 2.5) round linear steps, which read just as well on a log scale.
"""

from __future__ import annotations

import math

__all__ = ["MIN_TICKS", "log_ticks", "nice_ticks", "si", "tick_labels"]

MIN_TICKS = 3
MAX_TICKS = 10
_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
# Mantissas per decade, coarsest first: the first set that gives MIN_TICKS ticks in range wins.
_MANTISSAS = ((1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0))


def si(v: float) -> str:
    """``1.5k``, ``2M``, ``0.01``, ``102.5``: compact tick labels (a fourth digit only where three would round)."""
    a = abs(v)
    if a == 0:
        return "0"
    div, suffix = next(((d, s) for d, s in _SI if a >= d), (1.0, ""))
    x = v / div
    text = f"{x:.3g}"
    if float(text) != x and float(f"{x:.4g}") == x:
        text = f"{x:.4g}"
    return text + suffix


def tick_labels(ticks: list[float]) -> list[str]:
    """``si`` labels, with more digits where two ticks would otherwise read the same (a very narrow range)."""
    labels = [si(t) for t in ticks]
    digits = 4
    while len(set(labels)) < len(labels) and digits < 12:
        digits += 1
        labels = [f"{t:.{digits}g}" for t in ticks]
    return labels


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    t = first
    while t <= hi + 1e-9 * step:
        out.append(0.0 if abs(t) < 1e-12 * step else _round(t, step))
        t += step
    return out


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over ``[lo, hi]`` (``0 < lo < hi``): decades when the range spans more than
    three of them (every second or third decade past nine), else 1-2-5 values, finer where too few fall in range;
    at least ``MIN_TICKS`` of them with distinct labels."""
    if not (0 < lo < hi and math.isfinite(hi)):
        return [lo] if 0 < lo and math.isfinite(lo) else []
    decades = math.log10(hi) - math.log10(lo)
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if decades > 3:
        stride = max(1, math.ceil((b - a + 1) / MAX_TICKS))
        first = a + (-a) % stride  # multiples of the stride: 10^0, 10^3, 10^6 ... line up across charts
        return [10.0**e for e in range(first, b + 1, stride) if lo <= 10.0**e <= hi]
    for mantissas in _MANTISSAS:
        ticks = [m * 10.0**e for e in range(a, b + 1) for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= MIN_TICKS and len(ticks) <= 2 * MAX_TICKS:
            return _thin(ticks)
    return nice_ticks(lo, hi, 6)  # a step of at most a third of the range: three ticks or more


def _thin(ticks: list[float]) -> list[float]:
    """Every k-th tick so that at most ``MAX_TICKS`` remain (a dense 1-9 set over three decades)."""
    k = max(1, math.ceil(len(ticks) / MAX_TICKS))
    return ticks[::k]


def _round(t: float, step: float) -> float:
    """``t`` without the float noise of repeated addition (``0.30000000000000004`` -> ``0.3``)."""
    digits = max(0, -math.floor(math.log10(step)) + 2)
    return round(t, digits)
