"""What every source of small batches hands on: additive statistics of one optimizer step's small batches.

A collector never returns a ratio.  Everything it returns is a sum (of squared norms, of counts, of inverse
sizes), so statistics from several micro-batches or several ranks combine by addition before any estimate is
computed (STYLE.md rule 1).  This module sits below the collectors, the data-parallel sync and the estimators,
which all speak in these terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BigBatchNorms", "ParamSums", "PendingSum", "SmallBatchStats"]

PendingSum = tuple[Any, torch.Tensor]
"""A sum over the ranks already launched: ``(work, gathered)`` from ``DataParallelSync.start_sum``."""


class ParamSums:
    """Additive sums with one entry per measured parameter tensor, ``(P,)``: Python floats or a float64 tensor.

    Statistics of gradients in host memory are kept as Python floats: on a CPU a tiny tensor operation costs a
    few microseconds of dispatch, more than the arithmetic it does, and every number ends up on the host anyway.
    On an accelerator they stay a tensor that is never read back during the step.  The estimator follows its
    input (``estimators.engine``), so the choice is made once, where the sums are made.

    Args:
        values: a ``(P,)`` tensor, or ``P`` numbers.
    """

    __slots__ = ("_values",)

    def __init__(self, values: torch.Tensor | Sequence[float]) -> None:
        self._values: torch.Tensor | list[float] = (
            values if isinstance(values, torch.Tensor) else [float(v) for v in values]
        )

    @property
    def on_host(self) -> bool:
        """Whether the sums are Python floats."""
        return not isinstance(self._values, torch.Tensor)

    @property
    def device(self) -> torch.device:
        """Where the sums live (``cpu`` for Python floats)."""
        return self._values.device if isinstance(self._values, torch.Tensor) else torch.device("cpu")

    def __len__(self) -> int:
        return len(self._values)

    def tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """The sums as a tensor (float64 when they were floats, built on ``device``)."""
        if isinstance(self._values, torch.Tensor):
            return self._values
        return torch.tensor(self._values, dtype=torch.float64, device=device)

    def floats(self) -> list[float]:
        """The sums as Python floats; reads a tensor back from its device (a host synchronisation)."""
        if isinstance(self._values, torch.Tensor):
            return self._values.tolist()
        return list(self._values)

    def scaled(self, factor: float | torch.Tensor) -> ParamSums:
        """Every sum times ``factor`` (a 0-d tensor stays on its device: no synchronisation on the tensor path)."""
        if isinstance(self._values, torch.Tensor):
            return ParamSums(self._values * factor)
        f = float(factor.item()) if isinstance(factor, torch.Tensor) else float(factor)
        return ParamSums([v * f for v in self._values])

    def __repr__(self) -> str:
        return f"ParamSums({self._values!r})"


@dataclass(frozen=True)
class SmallBatchStats:
    """Sufficient statistics of the small batches of one optimizer step.

    Units: gradients are measured in the units of ``p.grad`` *as if* ``p.grad`` held the mean gradient over the
    step's ``B`` examples.  A small batch ``j`` of ``b_j`` examples whose share of ``p.grad`` is ``c_j`` has the
    mean gradient ``G_j = (B / b_j) c_j``.  This makes B_simple independent of whether the loss is a mean or a
    sum and of any 1/k accumulation scaling: both only rescale ``p.grad`` and every ``G_j`` alike.

    Attributes:
        small_sq_sum: ``sum_j |G_{j,p}|^2`` for each measured parameter tensor ``p``.
        n_small: number of small batches ``k``.
        inv_size_sum: ``sum_j 1 / b_j``.
        examples: examples the hooks saw in this step, or ``None`` when the source cannot count them.
        per_example: each small batch is one example, so over data-parallel ranks ``k`` and ``sum_j 1 / b_j``
            are both the step's batch size.
        in_flight: the sum of ``small_sq_sum`` over the ranks, already launched by the collector, if any.
        preconditioned: with a preconditioner (``noisescale.preconditioner``), ``sum_j |D^-1 G_{j,p}|^2`` in the
            same units (NaN where it could not be applied: ``preconditioned_reason``); ``None`` without one.
        preconditioned_reason: why ``preconditioned`` is missing although a preconditioner was given.
    """

    small_sq_sum: ParamSums
    n_small: int
    inv_size_sum: float
    examples: int | None
    per_example: bool = False
    in_flight: PendingSum | None = None
    preconditioned: ParamSums | None = None
    preconditioned_reason: str | None = None


@dataclass(frozen=True)
class BigBatchNorms:
    """``|G_B|^2`` per measured parameter: the squared norm of the step's accumulated gradient ``p.grad``.

    Attributes:
        sq_norms: one entry per parameter.
        rank_part: the entries are this rank's part only (gradients sharded over the ranks, FSDP2): their sum
            over the ranks is the whole.
        preconditioned: with a preconditioner, ``|D^-1 G_{B,p}|^2`` per parameter; ``None`` without one or when
            this step has none.
    """

    sq_norms: ParamSums
    rank_part: bool = False
    preconditioned: ParamSums | None = None
