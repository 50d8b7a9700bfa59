"""What ``noisescale.plan`` returns: the run's stretches, the model's totals, each schedule's cost, the caveats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from noisescale.errors import NoiseScaleError
from noisescale.planning.step_time import StepTime
from noisescale.planning.stretches import Stretch

if TYPE_CHECKING:
    from noisescale.planning.analysis import Analysis
    from noisescale.planning.model import Outcome
    from noisescale.planning.schedules import Schedule

__all__ = ["ASSUMPTIONS", "Plan", "PlanError", "PlanWarning", "Prediction"]

ASSUMPTIONS = (
    "B_noise is approximated by the measured B_simple; McCandlish et al. (2018) found B_simple above the critical "
    "batch by up to a few times on some tasks, which makes large batches look cheaper in steps than they are.",
    "Every schedule is assumed to run at its own best learning rate (re-tuned for each batch size), as in the model.",
    "Training progress is taken to depend only on how far the loss has come, not on the path: a stretch's noise "
    "scale is the recorded run's, whatever schedule reaches it.",
)


class PlanError(NoiseScaleError, ValueError):
    """The run cannot be planned from (too short, too noisy, no measurements, a target it never reached)."""


@dataclass(frozen=True)
class PlanWarning:
    """A weak spot of the model for this run.

    Attributes:
        code: ``"wide_band"``, ``"unbounded_band"``, ``"undefined"``, ``"short_run"``, ``"far_from_batch"``,
            ``"above_critical"``, ``"extrapolation"``, ``"no_loss"``, ``"coverage"``.
        message: one plain sentence.
        fraction: the fraction of the run's examples it concerns, where that applies.
    """

    code: str
    message: str
    fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fraction": self.fraction}


@dataclass(frozen=True)
class Prediction:
    """One schedule's predicted cost to reach the same point of training as the run.

    Attributes:
        name, kind, params: the schedule (see ``noisescale.planning.schedules``).
        steps, examples, time_s: with B_noise at the measured B_simple (``time_s`` needs a step-time model).
        steps_range, examples_range, time_range: lowest and highest over B_noise at either end of every
            stretch's band.
        batch_min, batch_max: the batch sizes the schedule used.
        steps_ratio, examples_ratio: against what the run itself took.
        extrapolated: the schedule's batch goes more than ``EXTRAPOLATION_FACTOR`` beyond the run's batches.
    """

    name: str
    kind: str
    params: dict[str, Any]
    steps: float
    examples: float
    time_s: float | None
    steps_range: tuple[float, float]
    examples_range: tuple[float, float]
    time_range: tuple[float, float] | None
    batch_min: float
    batch_max: float
    steps_ratio: float
    examples_ratio: float
    extrapolated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": self.params,
            "steps": self.steps,
            "examples": self.examples,
            "time_s": self.time_s,
            "steps_range": list(self.steps_range),
            "examples_range": list(self.examples_range),
            "time_range": None if self.time_range is None else list(self.time_range),
            "batch_min": self.batch_min,
            "batch_max": self.batch_max,
            "steps_ratio": self.steps_ratio,
            "examples_ratio": self.examples_ratio,
            "extrapolated": self.extrapolated,
        }


@dataclass(frozen=True)
class Plan:
    """A run read through McCandlish et al.'s model, and what other batch schedules would cost.

    Attributes:
        run: ``{"id", "name", "path"}`` of the run planned from.
        target_loss: the smoothed training loss planned to (``None``: the end of the run).
        loss_window: examples over which the training loss is smoothed (centred).
        steps, examples: what the run took to the target (or its end); wall_s: its measured wall-clock time.
        reached_loss: the smoothed loss there.
        batch_min, batch_max: the batch sizes the run used.
        measured: usable measurements of B_simple up to there.
        min_steps, min_examples: ``S_min`` and ``E_min`` summed over the stretches; ``min_*_range`` over the bands.
        critical_batch: ``E_min / S_min``, the run's average critical batch (``B_crit``).
        frontier: ``A = sum_i sqrt(dS_min_i dE_min_i)``.  Every fixed batch and every ``k x B_noise`` lands on
            ``(S - S_min)(E - E_min) = S_min E_min``; the best any schedule can do is ``(S - S_min)(E - E_min) = A^2``
            (batch proportional to ``sqrt(B_noise)``), lower whenever B_noise varies along the run.
        stretches: the run cut into stretches, each with its B_simple and band.
        stretch_min_steps, stretch_min_examples: ``dS_min`` and ``dE_min`` of each stretch.
        by_loss: ``[{"loss", "step", "examples", "fraction", "b_simple", "b_simple_low", "b_simple_high"}]``, the
            critical batch when the smoothed loss first reached each level.
        predictions: one per schedule, the run's own batches first (``kind == "replay"``, a self-check).
        warnings: where the model's assumptions are weak for this run.
        step_time: the step-time model used for ``time_s``, if any.
        assumptions: what the model takes for granted, in plain sentences.
        analysis: the stretches and pieces the predictions come from (for ``predict`` and the chart).
    """

    run: dict[str, Any]
    target_loss: float | None
    loss_window: float
    steps: int
    examples: int
    wall_s: float | None
    reached_loss: float | None
    batch_min: float
    batch_max: float
    measured: int
    min_steps: float
    min_examples: float
    min_steps_range: tuple[float, float]
    min_examples_range: tuple[float, float]
    critical_batch: float
    frontier: float
    stretches: list[Stretch]
    stretch_min_steps: list[float]
    stretch_min_examples: list[float]
    by_loss: list[dict[str, Any]]
    predictions: list[Prediction]
    warnings: list[PlanWarning]
    step_time: StepTime | None = None
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)
    analysis: Analysis | None = field(default=None, repr=False, compare=False)

    def predict(self, schedule: Schedule, *, step_time: StepTime | None = None) -> Outcome:
        """Steps, examples (and time) of one more schedule, with B_noise at the measured B_simple, e.g.
        ``plan.predict(noisescale.planning.Fixed(512)).steps``."""
        from noisescale.planning.model import predict

        if self.analysis is None:
            raise PlanError("this Plan holds no stretches to predict from (it was built without its analysis)")
        return predict(self.analysis.pieces("value"), schedule, step_time=step_time or self.step_time)

    def prediction(self, name: str) -> Prediction:
        """The prediction of the schedule called ``name`` (``KeyError`` if there is none)."""
        for p in self.predictions:
            if p.name == name:
                return p
        raise KeyError(f"no schedule named {name!r}; have {[p.name for p in self.predictions]}")

    def best_steps(self, examples: float) -> float | None:
        """The fewest steps any schedule needs with ``examples`` examples under the model (``None`` at or below
        ``E_min``): ``S_min + A^2 / (examples - E_min)``."""
        if examples <= self.min_examples:
            return None
        return self.min_steps + self.frontier**2 / (examples - self.min_examples)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``inf`` stays a float: ``noisescale.cli.format.dumps_json`` writes it as ``null``)."""
        total = self.examples or 1
        start = self.stretches[0].examples_start if self.stretches else 0
        return {
            "run": self.run,
            "target_loss": self.target_loss,
            "loss_window": self.loss_window,
            "reference": {
                "steps": self.steps,
                "examples": self.examples,
                "wall_s": self.wall_s,
                "reached_loss": self.reached_loss,
                "batch_min": self.batch_min,
                "batch_max": self.batch_max,
                "measured": self.measured,
            },
            "model": {
                "min_steps": self.min_steps,
                "min_examples": self.min_examples,
                "min_steps_range": list(self.min_steps_range),
                "min_examples_range": list(self.min_examples_range),
                "critical_batch": self.critical_batch,
                "frontier": self.frontier,
                "best_steps_at_run_examples": self.best_steps(self.examples),
            },
            "schedules": [p.to_dict() for p in self.predictions],
            "stretches": [
                {
                    **s.to_dict(),
                    "fraction_end": (s.examples_end - start) / total,
                    "min_steps": ms,
                    "min_examples": me,
                }
                for s, ms, me in zip(self.stretches, self.stretch_min_steps, self.stretch_min_examples)
            ],
            "critical_batch": {
                "by_fraction": [
                    {
                        "fraction": (s.examples_end - start) / total,
                        "examples": s.examples_end,
                        "loss": s.loss,
                        "b_simple": s.b_simple,
                        "b_simple_low": s.b_simple_low,
                        "b_simple_high": s.b_simple_high,
                        "batch": s.batch,
                    }
                    for s in self.stretches
                ],
                "by_loss": self.by_loss,
            },
            "warnings": [w.to_dict() for w in self.warnings],
            "step_time": None if self.step_time is None else self.step_time.to_dict(),
            "assumptions": list(self.assumptions),
        }
