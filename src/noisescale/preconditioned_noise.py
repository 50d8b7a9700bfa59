"""The monitor's second estimate: B_simple of Adam's preconditioned gradients, beside the plain one.

With ``GNSMonitor(model, precondition=optimizer)`` the micro-batch and rank collectors square each small batch's
gradient divided by Adam's ``sqrt(v_hat) + eps`` as well as the plain one, the big batch is read both ways, and
this estimate runs the same two-batch estimator and smoothing on those sums, with its own state
(``noisescale.preconditioner`` has the formula).  The result is a whole ``Measurement`` of its own, attached to
the plain one as ``m.preconditioned``, so it has a band, a status and per-layer values like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from noisescale.estimators.engine import StepEngine, StepOutput
from noisescale.estimators.rows import RowLayout
from noisescale.estimators.step import StepConstants
from noisescale.preconditioner import AdamPreconditioner
from noisescale.stats import BigBatchNorms, ParamSums, SmallBatchStats
from noisescale.types import Measurement

__all__ = ["EXAMPLE_SOURCE", "PreconditionedNoise"]

EXAMPLE_SOURCE = (
    "the example source's per-example norms are not preconditioned (their fast forms square the gradient without "
    "forming it): the preconditioned noise scale comes from micro-batches or ranks; use source='microbatch' with "
    "gradient accumulation, or source='rank' under DDP"
)


_NOT_READ = "the step's gradient was not read when its backward pass ended, so it could not be preconditioned"


class PreconditionedNoise:
    """Adam's preconditioner and the smoothing state of the preconditioned estimate.

    Args:
        optimizer: the Adam-family optimizer training the model.
        params: the measured parameters, ``(name, parameter)``.
        z: the band's normal quantile, as the plain estimate's.

    Raises:
        ConfigError: what ``AdamPreconditioner`` refuses.
    """

    def __init__(self, optimizer: Any, params: Sequence[tuple[str, nn.Parameter]], z: float) -> None:
        self.preconditioner = AdamPreconditioner(optimizer, params)
        self.engine = StepEngine(z)

    def big_norms(
        self, params: Sequence[nn.Parameter], plain: BigBatchNorms, scale: float | torch.Tensor | None
    ) -> BigBatchNorms:
        """``plain`` with the preconditioned ``|p.grad / d|^2`` of ``params`` beside it (read when backward ends).

        Args:
            scale: the loss scale the gradients carry (a ``GradScaler``'s), for Adam's divisor.
        """
        return BigBatchNorms(
            plain.sq_norms, rank_part=plain.rank_part, preconditioned=self.preconditioner.read(params, scale)
        )

    def stop(self) -> None:
        """The example source measures: nothing is preconditioned from now on (``EXAMPLE_SOURCE`` says why)."""
        if self.preconditioner.stopped is None:
            self.preconditioner.stop(EXAMPLE_SOURCE)

    def measure(
        self,
        layout: RowLayout,
        stats: SmallBatchStats,
        big: BigBatchNorms,
        consts: StepConstants,
        unscale: Callable[[ParamSums], ParamSums],
        plain: Measurement,
    ) -> Measurement:
        """Fold this step's preconditioned sums into the state; the measurement shares ``plain``'s step and source.

        Args:
            layout, consts: those of the plain estimate (same rows, same small batches and decay).
            stats, big: the step's statistics after the sum over ranks; their preconditioned sums are read.
            unscale: the monitor's removal of a ``GradScaler``'s scale (it scales both kinds of norms alike).
            plain: the plain measurement of the step.
        """
        reason = plain.undefined_reason if not consts.defined else _missing(stats, big)
        small_sums, big_sums = stats.preconditioned, big.preconditioned
        if reason is not None or small_sums is None or big_sums is None:
            small_sums = big_sums = ParamSums([0.0] * len(stats.small_sq_sum))
            consts = dataclasses.replace(consts, defined=False)
        return _beside(plain, self.engine.step(layout, unscale(small_sums), unscale(big_sums), consts), layout, reason)

    def current(self, layout: RowLayout, plain: Measurement) -> Measurement:
        """The restored averages as a measurement (``GNSMonitor`` after ``load_state_dict``)."""
        return _beside(plain, self.engine.current(layout), layout, None)

    def close(self) -> None:
        self.preconditioner.close()


def _beside(plain: Measurement, out: StepOutput, layout: RowLayout, reason: str | None) -> Measurement:
    """The preconditioned estimate's measurement, with ``plain``'s step, examples, source and time."""
    return Measurement(
        table=out.table,
        flags=out.flags,
        layer_names=layout.layer_names,
        module_names=layout.module_names,
        step=plain.step,
        examples=plain.examples,
        batch_size=plain.batch_size,
        source=plain.source,
        coverage=plain.coverage,
        undefined_reason=reason,
        wall_time=plain.wall_time,
    )


def _missing(stats: SmallBatchStats, big: BigBatchNorms) -> str | None:
    """Why this step has no preconditioned estimate, or ``None`` when it has one."""
    if stats.preconditioned_reason is not None:
        return stats.preconditioned_reason
    if stats.preconditioned is None or big.preconditioned is None:
        return EXAMPLE_SOURCE if stats.per_example else _NOT_READ
    return None
