"""The steps/examples trade-off of McCandlish et al. (2018), stretch by stretch: recovery and prediction.

Their model (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11):
a stretch of training that needs at least ``dS_min`` optimizer steps (with unlimited examples per step) and at
least ``dE_min`` examples (with one example per step) takes, at batch size ``B`` and the best learning rate,

    dS = dS_min (1 + B_noise / B)        dE = B dS = dE_min (1 + B / B_noise)        B_noise = dE_min / dS_min,

equivalently ``dS = dS_min + dE_min / B`` and ``dE = dE_min + B dS_min``.  With a constant ``B_noise`` and batch
this is the closed form ``S = S_min (1 + B_noise / B)``, ``E = E_min (1 + B / B_noise)``.

A run that took ``dS`` steps of batch ``B`` over a stretch whose noise scale is ``B_noise`` therefore needed

    dS_min = dS / (1 + B_noise / B)       dE_min = B_noise dS_min,

and any other batch schedule reaches the end of that stretch after ``dS_min + dE_min / B'`` steps.  Summing over
the stretches of a run gives the steps, examples (and, with a step-time model, the time) of another schedule to
reach the same point of training.  Everything here is plain float arithmetic on Python numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from noisescale.planning.schedules import Schedule
from noisescale.planning.step_time import StepTime

__all__ = ["MAX_NOISE", "Outcome", "Piece", "predict", "recover"]

MAX_NOISE = 1e15
"""An unbounded ``B_noise`` (a band's open upper end) is taken as this many examples: every step is then
example-limited, and the arithmetic stays finite."""

MAX_SUBSTEPS = 256
"""At most this many sub-pieces per piece when a schedule's batch depends on the steps or examples taken."""


@dataclass(frozen=True)
class Piece:
    """One stretch of training in the model's terms.

    Attributes:
        min_steps: ``dS_min``, the steps the stretch needs with unlimited examples per step.
        min_examples: ``dE_min``, the examples it needs with one example per step.
        b_noise: ``dE_min / dS_min`` (kept separately so that ``0`` and ``inf`` survive).
    """

    min_steps: float
    min_examples: float
    b_noise: float


@dataclass(frozen=True)
class Outcome:
    """What a schedule costs over a sequence of pieces.

    Attributes:
        steps, examples: totals (steps are fractional: the model is continuous).
        time_s: total seconds under the step-time model, ``None`` without one.
        batch_min, batch_max: the smallest and largest batch the schedule used.
    """

    steps: float
    examples: float
    time_s: float | None
    batch_min: float
    batch_max: float


def recover(steps: float, examples: float, b_noise: float) -> Piece:
    """``dS_min`` and ``dE_min`` of a stretch a run took in ``steps`` steps and ``examples`` examples.

    ``b_noise`` may be ``0`` (every step was step-limited: ``dS_min = dS``, ``dE_min = 0``) or ``inf`` (every
    step was example-limited: ``dS_min = 0``, ``dE_min = dE``).

    >>> p = recover(100, 6400, 64.0)   # batch 64 at B_noise 64: twice the minimum steps, twice the minimum examples
    >>> p.min_steps, p.min_examples
    (50.0, 3200.0)
    """
    if steps < 0 or examples < 0 or b_noise < 0 or math.isnan(b_noise):
        raise ValueError(f"steps, examples and b_noise must be >= 0, got {steps}, {examples}, {b_noise}")
    if steps == 0:
        return Piece(0.0, 0.0, b_noise)
    b_noise = min(b_noise, MAX_NOISE)
    batch = examples / steps
    min_steps = steps / (1.0 + b_noise / batch) if batch > 0 else 0.0
    return Piece(min_steps, b_noise * min_steps, b_noise)


def predict(pieces: Sequence[Piece], schedule: Schedule, *, step_time: StepTime | None = None) -> Outcome:
    """Steps, examples and time ``schedule`` needs to get through ``pieces`` in order.

    A schedule whose batch depends only on the stretch's noise scale (a fixed batch, ``k x B_noise``) is summed in
    closed form piece by piece.  One that depends on the steps or examples already taken (a ramp, a replayed
    run) is advanced in sub-pieces of about one of its own steps (at most ``MAX_SUBSTEPS`` per piece), so its batch
    is re-read as it goes.

    >>> from noisescale.planning.schedules import Fixed
    >>> o = predict([Piece(50.0, 3200.0, 64.0)], Fixed(16))
    >>> o.steps, o.examples      # S_min (1 + 64/16), E_min (1 + 16/64)
    (250.0, 4000.0)
    """
    steps = examples = 0.0
    time_s: float | None = 0.0 if step_time is not None else None
    b_lo, b_hi = math.inf, 0.0
    for piece in pieces:
        if piece.min_steps == 0 and piece.min_examples == 0:
            continue
        b_noise = min(piece.b_noise, MAX_NOISE)
        parts = 1
        if schedule.stateful:
            batch = schedule.batch(steps=steps, examples=examples, b_noise=b_noise)
            parts = max(1, min(MAX_SUBSTEPS, math.ceil(piece.min_steps + piece.min_examples / batch - 1e-9)))
        ds_min, de_min = piece.min_steps / parts, piece.min_examples / parts
        for _ in range(parts):
            batch = schedule.batch(steps=steps, examples=examples, b_noise=b_noise)
            if not batch > 0:
                raise ValueError(f"schedule {schedule.name!r} gave batch size {batch}; a batch must be > 0")
            ds = ds_min + de_min / batch
            steps += ds
            examples += de_min + batch * ds_min
            if time_s is not None and step_time is not None:
                time_s += ds * step_time.seconds_per_step(batch)
            b_lo, b_hi = min(b_lo, batch), max(b_hi, batch)
    if b_hi == 0.0:
        b_lo = b_hi = math.nan
    return Outcome(steps=steps, examples=examples, time_s=time_s, batch_min=b_lo, batch_max=b_hi)
