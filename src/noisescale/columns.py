"""The columns of a measurement table, in a module of their own that needs no torch.

The monitor fills them (``noisescale.types`` re-exports ``COLUMNS``); the run store's schema, its readers and
the command line name them too, and must not pay for importing torch to do so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

__all__ = ["COLUMNS", "PRECONDITIONED", "RowsView"]

COLUMNS = (
    "b_simple",
    "b_simple_low",
    "b_simple_high",
    "b_simple_raw",
    "grad_sq",
    "trace_cov",
    "grad_sq_raw",
    "trace_cov_raw",
)
"""The columns of a measurement table, in order; one row for the whole model, then one per layer/module."""

PRECONDITIONED = ("b_precond", "b_precond_low", "b_precond_high", "b_precond_raw")
"""The metric names under which sinks receive Adam's preconditioned noise scale (``GNSMonitor(precondition=)``):
its ``b_simple``, band and raw value, the first four ``COLUMNS`` of ``Measurement.preconditioned``."""


class RowsView(Sequence[list[float]]):
    """A measurement table whose rows are worked out when read (``_row(i)``), a slice row by row.

    Subclasses give ``__len__`` and ``_row``; reading the total row then never works out the per-layer rows.
    """

    def _row(self, i: int) -> list[float]:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> list[float]: ...

    @overload
    def __getitem__(self, i: slice) -> list[list[float]]: ...

    def __getitem__(self, i: int | slice) -> list[float] | list[list[float]]:
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        return self._row(i)
