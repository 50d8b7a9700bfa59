"""``noisescale.plan(run)``: read a run, recover ``dS_min`` and ``dE_min`` along it, price other batch schedules.

Reading the run store is here and nowhere else under ``noisescale.plan``: the arithmetic lives in ``model`` and
``schedules``, the cutting into stretches in ``stretches``, the caveats in ``caveats``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any, Literal

from noisescale.errors import ConfigError
from noisescale.planning.analysis import Analysis
from noisescale.planning.caveats import EXTRAPOLATION_FACTOR, caveats
from noisescale.planning.model import predict
from noisescale.planning.result import Plan, PlanError, Prediction
from noisescale.planning.schedules import Devices, Fixed, FollowNoise, LinearRamp, Replay, Schedule
from noisescale.planning.step_time import StepTime
from noisescale.planning.stretches import Stretch, crossing, cut_stretches, rows_from_measurements, smooth_loss

__all__ = ["MIN_MEASURED", "analyse", "default_schedules", "plan", "price"]

MIN_MEASURED = 20
"""Fewer usable B_simple measurements than this (up to the target) and the run is refused as too short."""
MAX_NOISY_FRACTION = 0.5
"""A run whose B_simple is undefined, or unbounded above, on more than this fraction of its examples is refused."""
MAX_SWEEP = 12
LOSS_LEVELS = 6


def plan(
    run: Any,
    *,
    target_loss: float | None = None,
    batches: Sequence[float] | Literal["auto"] = "auto",
    ramp: LinearRamp | Literal["auto"] | None = "auto",
    follow: Sequence[float] = (1.0,),
    min_batch: float = 1.0,
    max_batch: float | None = None,
    devices: Devices | None = None,
    schedules: Sequence[Schedule] = (),
    step_time: StepTime | None = None,
    stretches: int = 10,
    loss_window: float | None = None,
    confidence: float = 0.9,
) -> Plan:
    """Plan other batch schedules from one recorded run (McCandlish et al. 2018's model of large-batch training).

    Along the run, each stretch of training needed ``dS_min = dS / (1 + B_noise / B)`` steps and
    ``dE_min = B_noise dS_min`` examples, with ``B`` the batch the run used and ``B_noise`` approximated by the
    stretch's measured B_simple.  Another schedule then takes ``dS_min + dE_min / B'`` steps over the stretch.

    Args:
        run: a ``noisescale.store.RunReader``, or a run file's path (or a run's id or name in ``./runs``).
        target_loss: plan up to where the run's smoothed training loss first reached this (default: its end).
        batches: fixed batch sizes to price; ``"auto"``: powers of two around the run's batch and B_simple.
        ramp: a linear ramp to price; ``"auto"``: from about the first stretch's B_simple to about the last one's
            over the run's examples; ``None``: none.
        follow: the ``k`` of each noise-following schedule ``k x B_simple`` to price.
        min_batch, max_batch: the bounds of the noise-following schedules.
        devices: price ``devices x micro-batch`` as well.
        schedules: more schedules to price (e.g. ``Replay`` of another run's batches).
        step_time: seconds per step as a function of the batch; without it no times are predicted.
        stretches: how many stretches to cut the run into (fewer where the measurements are sparse).
        loss_window: examples over which the loss is smoothed (default: 2% of the run, at least 10 steps).
        confidence: the coverage of each stretch's B_simple band.

    Raises:
        PlanError: the run is too short or too noisy to plan from, or never reached ``target_loss``.
        noisescale.store.StoreError: the run cannot be read.
    """
    if isinstance(run, (str, os.PathLike)):
        from noisescale.store import open_run

        with open_run(run) as reader:
            return plan(
                reader,
                target_loss=target_loss,
                batches=batches,
                ramp=ramp,
                follow=follow,
                min_batch=min_batch,
                max_batch=max_batch,
                devices=devices,
                schedules=schedules,
                step_time=step_time,
                stretches=stretches,
                loss_window=loss_window,
                confidence=confidence,
            )
    analysis = analyse(
        run, target_loss=target_loss, stretches=stretches, loss_window=loss_window, confidence=confidence
    )
    chosen = default_schedules(
        analysis, batches=batches, ramp=ramp, follow=follow, min_batch=min_batch, max_batch=max_batch
    )
    if devices is not None:
        chosen.append(devices)
    chosen.extend(schedules)
    return price(analysis, chosen, step_time=step_time)


def analyse(
    reader: Any,
    *,
    target_loss: float | None = None,
    stretches: int = 10,
    loss_window: float | None = None,
    confidence: float = 0.9,
) -> Analysis:
    """Read ``reader`` (a ``RunReader``) up to ``target_loss`` and cut it into stretches; refuse what cannot be
    planned from."""
    from noisescale.estimators.band import z_for

    if isinstance(stretches, bool) or not isinstance(stretches, int) or stretches < 1:
        raise ConfigError(f"stretches must be a positive integer, got {stretches!r}")
    if target_loss is not None and not (isinstance(target_loss, (int, float)) and math.isfinite(target_loss)):
        raise ConfigError(f"target_loss must be a finite number or None, got {target_loss!r}")
    if loss_window is not None and not (
        isinstance(loss_window, (int, float)) and math.isfinite(loss_window) and loss_window > 0
    ):
        raise ConfigError(f"loss_window must be a positive number of examples or None, got {loss_window!r}")
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ConfigError(f"confidence must be a float in (0, 1), e.g. 0.9, got {confidence!r}")

    with reader.snapshot():
        info = reader.info
        measurements = reader.measurements()
        loss = reader.metric("loss")
    name = f"{info.name!r} ({info.id})"
    run_info = {"id": info.id, "name": info.name, "path": str(info.path), "config": info.config}
    rows = rows_from_measurements(measurements)
    if not rows:
        raise PlanError(f"run {name} holds no B_simple measurements: record it with GNSMonitor(model, run=run)")
    # Losses: at recorded examples where the metric has them, else at the examples of a measurement of that step.
    ex_of_step = {r.step: r.examples for r in rows}
    pts = []
    for s, e, v in zip(loss.step, loss.examples, loss.value):
        ex = e if e is not None else ex_of_step.get(s)
        if v is not None and ex is not None and math.isfinite(v):
            pts.append((int(s), float(ex), float(v)))
    pts.sort()
    has_loss = bool(pts)
    median_batch = statistics.median(r.examples_taken / r.steps for r in rows if r.steps > 0)
    window = float(loss_window) if loss_window is not None else max(10 * median_batch, 0.02 * rows[-1].examples)
    smoothed = smooth_loss([p[1] for p in pts], [p[2] for p in pts], window) if pts else []

    reached_loss = smoothed[-1] if smoothed else None
    if target_loss is not None:
        if not pts:
            raise PlanError(
                f"run {name} has no logged training loss, so it cannot be planned to loss {target_loss:g}: log it "
                "with run.log(step, {'loss': loss}), or leave out the target to plan to the end of the run"
            )
        hit = crossing([p[0] for p in pts], smoothed, target_loss)
        if hit is None:
            raise PlanError(
                f"run {name} never reached training loss {target_loss:g} (smoothed over {window:,.0f} examples, "
                f"lowest {min(smoothed):.4g}): pick a target the run reached, or plan to its end"
            )
        reached_loss = next(v for p, v in zip(pts, smoothed) if p[0] == hit)
        cut = next((i for i, r in enumerate(rows) if r.step >= hit), len(rows) - 1)
        rows = rows[: cut + 1]

    usable = sum(1 for r in rows if r.trace_cov_raw is not None)
    where = f" up to loss {target_loss:g}" if target_loss is not None else ""
    if usable < MIN_MEASURED:
        raise PlanError(
            f"run {name} is too short to plan from: {usable} usable B_simple measurement(s){where}, at least "
            f"{MIN_MEASURED} needed: train longer (or plan to a lower target loss)"
        )
    cut_up = cut_stretches(rows, stretches, z=z_for(confidence))
    noisy = sum(s.examples for s in cut_up if s.filled or s.b_simple is None or s.b_simple_high == math.inf)
    total = sum(s.examples for s in cut_up) or 1
    if all(s.b_simple is None for s in cut_up) or noisy / total > MAX_NOISY_FRACTION:
        raise PlanError(
            f"run {name} is too noisy to plan from: B_simple is undefined or its {100 * confidence:.0f}% band is "
            f"unbounded above on {100 * noisy / total:.0f}% of its examples{where} (|G|^2 cannot be told from 0): "
            f"train longer, or pass fewer stretches (now {stretches}) so each averages more steps"
        )
    # Each stretch's mean loss; the critical batch at each loss level.
    with_loss = []
    for s in cut_up:
        vals = [(p[1], p[2]) for p in pts if s.first_step <= p[0] <= s.last_step]
        with_loss.append(_with_loss(s, vals))
    by_loss = _by_loss(pts, smoothed, with_loss, reached_loss) if pts else []
    walls = [m["wall_time"] for m in measurements if int(m["step"]) <= rows[-1].step]
    wall_s = (walls[-1] - walls[0]) * len(walls) / (len(walls) - 1) if len(walls) > 1 else None
    coverage = measurements[-1].get("coverage") if measurements else None
    return Analysis(
        run=run_info,
        rows=rows,
        stretches=with_loss,
        target_loss=None if target_loss is None else float(target_loss),
        loss_window=window,
        reached_loss=reached_loss,
        wall_s=wall_s,
        coverage=coverage,
        by_loss=by_loss,
        has_loss=has_loss,
    )


def _with_loss(s: Stretch, vals: list[tuple[float, float]]) -> Stretch:
    from dataclasses import replace

    if not vals:
        return s
    prev = float(s.examples_start)
    num = den = 0.0
    for ex, v in vals:
        w = max(ex - prev, 1e-12)
        num, den, prev = num + w * v, den + w, ex
    return replace(s, loss=num / den)


def _by_loss(
    pts: list[tuple[int, float, float]], smoothed: list[float], stretches: list[Stretch], reached: float | None
) -> list[dict[str, Any]]:
    """The stretch where the smoothed loss first reached each of ``LOSS_LEVELS`` log-spaced levels."""
    first, last = smoothed[0], reached if reached is not None else smoothed[-1]
    if not (first > last > 0):
        return []
    total = stretches[-1].examples_end - stretches[0].examples_start or 1
    out = []
    for i in range(1, LOSS_LEVELS + 1):
        level = first * (last / first) ** (i / LOSS_LEVELS)
        step = crossing([p[0] for p in pts], smoothed, level * (1 + 1e-9))
        if step is None:
            continue
        s = next((s for s in stretches if s.first_step <= step <= s.last_step), stretches[-1])
        ex = next(p[1] for p in pts if p[0] == step)
        out.append(
            {
                "loss": level,
                "step": step,
                "examples": ex,
                "fraction": (ex - stretches[0].examples_start) / total,
                "b_simple": s.b_simple,
                "b_simple_low": s.b_simple_low,
                "b_simple_high": s.b_simple_high,
            }
        )
    return out


def _pow2_between(lo: float, hi: float) -> list[int]:
    a = max(0, math.floor(math.log2(max(lo, 1.0))))
    b = max(a, math.ceil(math.log2(max(hi, 1.0))))
    return [2**e for e in range(a, b + 1)]


def _pow2_near(v: float) -> int:
    return 2 ** max(0, round(math.log2(max(v, 1.0))))


def default_schedules(
    analysis: Analysis,
    *,
    batches: Sequence[float] | Literal["auto"] = "auto",
    ramp: LinearRamp | Literal["auto"] | None = "auto",
    follow: Sequence[float] = (1.0,),
    min_batch: float = 1.0,
    max_batch: float | None = None,
) -> list[Schedule]:
    """The schedules ``plan`` prices unless told otherwise: a sweep of fixed batches, a ramp, ``k x B_simple``."""
    out: list[Schedule] = []
    values = [s.b_simple for s in analysis.stretches if s.b_simple is not None]
    used = [r.examples_taken / r.steps for r in analysis.rows if r.steps > 0]
    if batches == "auto":
        lo = min([*used, *values]) / 2
        hi = max([*used, *values]) * 2
        sweep = _pow2_between(lo, hi)
        while len(sweep) > MAX_SWEEP:  # keep every other power, always the middle of the range
            sweep = sweep[::2]
        out += [Fixed(b) for b in sweep]
    else:
        out += [Fixed(b) for b in batches]
    if ramp == "auto":
        start, end = _pow2_near(values[0]), _pow2_near(values[-1])
        if end != start:
            out.append(LinearRamp(start, end, float(analysis.examples)))
    elif ramp is not None:
        out.append(ramp)
    out += [FollowNoise(k, min_batch=min_batch, max_batch=max_batch) for k in follow]
    return out


def price(analysis: Analysis, schedules: Sequence[Schedule], *, step_time: StepTime | None = None) -> Plan:
    """Each schedule's steps, examples (and time) to reach the end of ``analysis``, with ranges over the bands."""
    pieces = {end: analysis.pieces(end) for end in ("value", "low", "high")}
    run_steps, run_examples = analysis.steps, analysis.examples
    used = [r.examples_taken / r.steps for r in analysis.rows if r.steps > 0]
    b_min, b_max = min(used), max(used)
    own = Replay(
        [r.examples for r in analysis.rows],
        [r.examples_taken / max(r.steps, 1) for r in analysis.rows],
        label="this run",
    )
    predictions = []
    for sched in [own, *schedules]:
        outs = [predict(pieces[end], sched, step_time=step_time) for end in ("value", "low", "high")]
        o = outs[0]
        times = [x.time_s for x in outs if x.time_s is not None]
        far = o.batch_max > EXTRAPOLATION_FACTOR * b_max or o.batch_min < b_min / EXTRAPOLATION_FACTOR
        predictions.append(
            Prediction(
                name=sched.name,
                kind=sched.kind,
                params=sched.params(),
                steps=o.steps,
                examples=o.examples,
                time_s=o.time_s,
                steps_range=(min(x.steps for x in outs), max(x.steps for x in outs)),
                examples_range=(min(x.examples for x in outs), max(x.examples for x in outs)),
                time_range=(min(times), max(times)) if times else None,
                batch_min=o.batch_min,
                batch_max=o.batch_max,
                steps_ratio=o.steps / run_steps if run_steps else math.nan,
                examples_ratio=o.examples / run_examples if run_examples else math.nan,
                extrapolated=far and sched is not own,
            )
        )
    totals = {end: (sum(p.min_steps for p in ps), sum(p.min_examples for p in ps)) for end, ps in pieces.items()}
    s_min, e_min = totals["value"]
    per_stretch_s, per_stretch_e = [], []
    value_pieces = pieces["value"]
    k = 0
    for s in analysis.stretches:
        n = s.last_row - s.first_row + 1
        chunk = value_pieces[k : k + n]
        per_stretch_s.append(sum(p.min_steps for p in chunk))
        per_stretch_e.append(sum(p.min_examples for p in chunk))
        k += n
    return Plan(
        run=dict(analysis.run),
        target_loss=analysis.target_loss,
        loss_window=analysis.loss_window,
        steps=run_steps,
        examples=run_examples,
        wall_s=analysis.wall_s,
        reached_loss=analysis.reached_loss,
        batch_min=b_min,
        batch_max=b_max,
        measured=analysis.measured,
        min_steps=s_min,
        min_examples=e_min,
        min_steps_range=(min(t[0] for t in totals.values()), max(t[0] for t in totals.values())),
        min_examples_range=(min(t[1] for t in totals.values()), max(t[1] for t in totals.values())),
        critical_batch=e_min / s_min if s_min > 0 else math.inf,
        frontier=sum(math.sqrt(p.min_steps * p.min_examples) for p in pieces["value"]),
        stretches=analysis.stretches,
        stretch_min_steps=per_stretch_s,
        stretch_min_examples=per_stretch_e,
        by_loss=analysis.by_loss,
        predictions=predictions,
        warnings=caveats(analysis, predictions, critical_batch=e_min / s_min if s_min > 0 else math.inf),
        step_time=step_time,
        analysis=analysis,
    )
