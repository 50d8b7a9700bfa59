"""A recorded run cut into stretches of training, each with its own B_simple and band; the loss it reached.

The monitor's smoothed ``b_simple`` lags a growing noise scale (it is an exponential average over past steps).
The planner instead averages each stretch's raw per-step estimates of ``tr(Sigma)`` and ``|G|^2`` separately
(each is unbiased, their ratio is not) and divides, and bounds the ratio with Fieller's band from the spread of
those per-step estimates.  Steps that were skipped or undefined still count as training, not as measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Row", "Stretch", "crossing", "cut_stretches", "rows_from_measurements", "smooth_loss"]

MIN_MEASURED_PER_STRETCH = 5
"""A stretch with fewer usable measurements is merged into its neighbour."""


@dataclass(frozen=True)
class Row:
    """One recorded measurement: the training since the previous one and this step's raw estimates.

    Attributes:
        step, examples: counters at the end of this step.
        steps, examples_taken: steps and examples since the previous recorded measurement (this one included).
        trace_cov_raw, grad_sq_raw: this step's unbiased estimates; ``None`` unless the step's status is ok.
    """

    step: int
    examples: int
    steps: int
    examples_taken: int
    trace_cov_raw: float | None
    grad_sq_raw: float | None


@dataclass(frozen=True)
class Stretch:
    """A stretch of the recorded run with its noise scale.

    Attributes:
        index: 0, 1, ... in training order.
        first_row, last_row: indices into the rows (inclusive).
        first_step, last_step: the optimizer steps it covers (inclusive).
        steps, examples: what the run spent on it.
        examples_start, examples_end: examples seen at its start and end.
        measured: usable measurements in it.
        b_simple, b_simple_low, b_simple_high: mean raw ``tr(Sigma)`` over mean raw ``|G|^2`` and its band
            (``None`` while undefined; ``inf`` for an unbounded upper end).
        filled: ``b_simple`` was undefined here and was taken from the neighbouring stretches.
        loss: the training loss averaged over the stretch (``None`` without a logged loss).
    """

    index: int
    first_row: int
    last_row: int
    first_step: int
    last_step: int
    steps: int
    examples: int
    examples_start: int
    examples_end: int
    measured: int
    b_simple: float | None
    b_simple_low: float | None
    b_simple_high: float | None
    filled: bool = False
    loss: float | None = None

    @property
    def batch(self) -> float:
        """Mean batch size over the stretch (examples per step)."""
        return self.examples / self.steps if self.steps else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "steps": self.steps,
            "examples": self.examples,
            "examples_start": self.examples_start,
            "examples_end": self.examples_end,
            "batch": self.batch,
            "measured": self.measured,
            "b_simple": self.b_simple,
            "b_simple_low": self.b_simple_low,
            "b_simple_high": self.b_simple_high,
            "filled": self.filled,
            "loss": self.loss,
        }


def rows_from_measurements(measurements: Sequence[Mapping[str, Any]]) -> list[Row]:
    """``RunReader.measurements()`` as rows of training taken since the previous measurement (in step order)."""
    out: list[Row] = []
    prev_step = prev_ex = 0
    for m in sorted(measurements, key=lambda r: int(r["step"])):
        step, ex = int(m["step"]), int(m["examples"])
        ok = m.get("status") == "ok" and m.get("trace_cov_raw") is not None and m.get("grad_sq_raw") is not None
        t = float(m["trace_cov_raw"]) if ok else None
        g = float(m["grad_sq_raw"]) if ok else None
        if t is not None and g is not None and not (math.isfinite(t) and math.isfinite(g)):
            t = g = None
        out.append(Row(step, ex, step - prev_step, ex - prev_ex, t, g))
        prev_step, prev_ex = step, ex
    return out


def smooth_loss(examples: Sequence[float], values: Sequence[float], window: float) -> list[float]:
    """Each loss averaged over the steps whose examples lie within ``window / 2`` of its own, weighted by their
    examples (a per-step loss is a mean over that step's batch).  Centred, so it does not lag the curve.
    """
    n = len(values)
    if n != len(examples):
        raise ValueError(f"examples and values differ in length: {len(examples)} != {len(values)}")
    weights = [max(1e-12, examples[i] - (examples[i - 1] if i else 0.0)) for i in range(n)]
    cw = [0.0]
    cv = [0.0]
    for w, v in zip(weights, values):
        cw.append(cw[-1] + w)
        cv.append(cv[-1] + w * v)
    out = []
    lo = hi = 0
    half = window / 2.0
    for i in range(n):
        while examples[lo] < examples[i] - half:
            lo += 1
        while hi + 1 < n and examples[hi + 1] <= examples[i] + half:
            hi += 1
        hi = max(hi, i)
        out.append((cv[hi + 1] - cv[lo]) / (cw[hi + 1] - cw[lo]))
    return out


def crossing(steps: Sequence[int], smoothed: Sequence[float], target: float) -> int | None:
    """The first step at which the smoothed loss is at or below ``target`` (``None`` if it never is)."""
    for s, v in zip(steps, smoothed):
        if v <= target:
            return int(s)
    return None


def cut_stretches(rows: Sequence[Row], count: int, *, z: float) -> list[Stretch]:
    """Cut ``rows`` into about ``count`` stretches of equal examples, each with at least
    ``MIN_MEASURED_PER_STRETCH`` usable measurements where the run has them, and estimate each one's B_simple.
    """
    import torch

    from noisescale.estimators.band import fieller_band

    if not rows:
        return []
    total = rows[-1].examples - (rows[0].examples - rows[0].examples_taken)
    start = rows[0].examples - rows[0].examples_taken
    groups: list[list[int]] = [[] for _ in range(max(1, count))]
    for i, r in enumerate(rows):
        mid = r.examples - 0.5 * r.examples_taken - start
        groups[min(len(groups) - 1, int(len(groups) * mid / total) if total > 0 else 0)].append(i)
    groups = [g for g in groups if g]
    groups = _merge_thin(groups, rows)

    stats = []
    for g in groups:
        pairs = [(r.trace_cov_raw, r.grad_sq_raw) for r in (rows[i] for i in g)]
        both = [(t, d) for t, d in pairs if t is not None and d is not None]
        stats.append(_moments([t for t, _ in both], [d for _, d in both]))
    tt = torch.tensor([s[0] for s in stats], dtype=torch.float64)
    gg = torch.tensor([s[1] for s in stats], dtype=torch.float64)
    low, high = fieller_band(
        tt,
        gg,
        torch.tensor([s[2] for s in stats], dtype=torch.float64),
        torch.tensor([s[3] for s in stats], dtype=torch.float64),
        torch.tensor([s[4] for s in stats], dtype=torch.float64),
        z,
    )
    out = []
    for k, (g, s) in enumerate(zip(groups, stats)):
        first, last = rows[g[0]], rows[g[-1]]
        n, mean_t, mean_g = s[5], s[0], s[1]
        defined = n > 0 and mean_g > 0 and mean_t >= 0
        out.append(
            Stretch(
                index=k,
                first_row=g[0],
                last_row=g[-1],
                first_step=first.step - first.steps + 1,
                last_step=last.step,
                steps=sum(rows[i].steps for i in g),
                examples=sum(rows[i].examples_taken for i in g),
                examples_start=first.examples - first.examples_taken,
                examples_end=last.examples,
                measured=n,
                b_simple=mean_t / mean_g if defined else None,
                b_simple_low=float(low[k]) if defined and n >= 2 else (0.0 if defined else None),
                b_simple_high=float(high[k]) if defined and n >= 2 else (math.inf if defined else None),
            )
        )
    return _fill_undefined(out)


def _merge_thin(groups: list[list[int]], rows: Sequence[Row]) -> list[list[int]]:
    def measured(g: list[int]) -> int:
        return sum(1 for i in g if rows[i].trace_cov_raw is not None)

    groups = [list(g) for g in groups]
    i = 0
    while len(groups) > 1 and i < len(groups):
        if measured(groups[i]) < MIN_MEASURED_PER_STRETCH:
            j = i + 1 if i + 1 < len(groups) else i - 1
            lo, hi = min(i, j), max(i, j)
            groups[lo : hi + 1] = [groups[lo] + groups[hi]]
            i = lo
        else:
            i += 1
    return groups


def _moments(t: list[float], g: list[float]) -> tuple[float, float, float, float, float, int]:
    """Means of ``t`` and ``g``, the variances of those means and their covariance, and the count."""
    n = len(t)
    if n == 0:
        return (math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    mt, mg = sum(t) / n, sum(g) / n
    if n < 2:
        return (mt, mg, math.inf, math.inf, 0.0, n)
    vt = sum((x - mt) ** 2 for x in t) / (n - 1) / n
    vg = sum((x - mg) ** 2 for x in g) / (n - 1) / n
    c = sum((x - mt) * (y - mg) for x, y in zip(t, g)) / (n - 1) / n
    return (mt, mg, vt, vg, c, n)


def _fill_undefined(stretches: list[Stretch]) -> list[Stretch]:
    """An undefined stretch takes the geometric mean of its nearest defined neighbours and the hull of their
    bands (flagged ``filled``); with no defined stretch at all, nothing is filled."""
    defined = [s for s in stretches if s.b_simple is not None]
    if not defined:
        return stretches
    out = []
    for s in stretches:
        if s.b_simple is not None:
            out.append(s)
            continue
        before = next((d for d in reversed(defined) if d.index < s.index), None)
        after = next((d for d in defined if d.index > s.index), None)
        near = [d for d in (before, after) if d is not None]
        vals = [max(d.b_simple or 0.0, 1e-12) for d in near]
        out.append(
            replace(
                s,
                b_simple=math.exp(sum(math.log(v) for v in vals) / len(vals)),
                b_simple_low=min(d.b_simple_low or 0.0 for d in near),
                b_simple_high=max(d.b_simple_high if d.b_simple_high is not None else math.inf for d in near),
                filled=True,
            )
        )
    return out
