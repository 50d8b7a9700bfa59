"""One optimizer step of estimation: two-batch estimate, smoothing update and a lazily built summary table.

Two paths compute the same numbers (a test holds them to each other):

* ``device_step``: vectorised tensor maths over all rows; never synchronises with the device, so it suits
  accelerators, where the table is only built if a number is read;
* ``host_step``: plain floats row by row (``scalar``), for rows that live in host memory, where a tiny tensor
  operation costs more than the arithmetic it does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from noisescale.columns import RowsView
from noisescale.estimators.scalar import RowState, summarize_row, update_row
from noisescale.estimators.smoothing import EMAState, ema_update
from noisescale.estimators.summary import summary_table
from noisescale.estimators.two_batch import two_batch_coefficients, two_batch_from_sums

__all__ = [
    "StepConstants",
    "StepResult",
    "device_step",
    "host_step",
    "host_table",
    "rows_to_state",
    "state_to_rows",
]

Table = torch.Tensor | Sequence[list[float]]
Flags = torch.Tensor | list[int]


@dataclass(frozen=True)
class StepConstants:
    """What one step's estimate needs besides the sums.

    Attributes:
        n_small: number of small batches ``k``.
        inv_size_sum: ``sum_j 1 / b_j``.
        batch_size: ``B``, examples in the step.
        beta: decay of the moving averages for this step (``smoothing.decay_for``).
        z: normal quantile of the band's confidence.
        defined: whether the step can be estimated at all (at least two small batches, smaller than ``B``).
    """

    n_small: int
    inv_size_sum: float
    batch_size: int
    beta: float
    z: float
    defined: bool


@dataclass(frozen=True)
class StepResult:
    """The state after the step and thunks that build what a ``Measurement`` shows.

    Attributes:
        state: smoothing state after this step (``EMAState`` on the device path, one ``RowState`` per row on
            the host path).
        skipped: steps skipped so far for non-finite statistics.
        table: builds the ``(R, 8)`` table of ``noisescale.types.COLUMNS``.
        flags: builds ``[skipped this step, undefined this step, steps skipped so far]``.
    """

    state: EMAState | tuple[RowState, ...]
    skipped: torch.Tensor | int
    table: Callable[[], Table]
    flags: Callable[[], Flags]


def device_step(
    state: EMAState,
    small_rows: torch.Tensor,
    big_rows: torch.Tensor,
    c: StepConstants,
    *,
    skipped: torch.Tensor,
) -> StepResult:
    """Vectorised step over ``(R,)`` rows of small-batch and big-batch sums; no host synchronisation.

    A step with any non-finite statistic (NaN/inf gradient, fp16 overflow) is skipped whole; a row without signal
    (all-zero gradient) or a step that cannot be estimated (``defined`` false) is left out of the averages.
    """
    if c.defined:
        est = two_batch_from_sums(small_rows, c.n_small, c.inv_size_sum, big_rows, c.batch_size)
        grad_sq_raw, trace_cov_raw = est.grad_sq, est.trace_cov
    else:
        grad_sq_raw = trace_cov_raw = torch.full_like(small_rows, float("nan"))
    step_ok = torch.isfinite(small_rows[0]) & torch.isfinite(big_rows[0])  # rows sum into the total
    used = ((small_rows != 0) | (big_rows != 0)) & step_ok
    if not c.defined:
        used = torch.zeros_like(used)
    new_state = ema_update(state, grad_sq_raw, trace_cov_raw, c.beta, used)
    skipped = skipped + (~step_ok).to(torch.int64)
    return StepResult(
        state=new_state,
        skipped=skipped,
        table=functools.partial(summary_table, new_state, grad_sq_raw, trace_cov_raw, used, c.z),
        flags=functools.partial(_device_flags, step_ok, used, skipped),
    )


def host_step(
    state: tuple[RowState, ...],
    small_rows: Sequence[float],
    big_rows: Sequence[float],
    c: StepConstants,
    *,
    skipped: int,
) -> StepResult:
    """The same step as ``device_step`` on Python floats, row by row."""
    step_ok = math.isfinite(small_rows[0]) and math.isfinite(big_rows[0])
    nan = float("nan")
    if c.defined:
        tr_s, tr_b, g_s, g_b = two_batch_coefficients(c.n_small, c.inv_size_sum, c.batch_size)
    raws: list[tuple[float, float]] = []
    used: list[bool] = []
    rows: list[RowState] = []
    for s, b, row in zip(small_rows, big_rows, state, strict=True):
        if c.defined:
            g, t = g_s * s + g_b * b, tr_s * s + tr_b * b
        else:
            g = t = nan
        use = step_ok and c.defined and (s != 0 or b != 0)
        raws.append((g, t))
        used.append(use)
        rows.append(update_row(row, g, t, c.beta) if use else row)
    new_state = tuple(rows)
    skipped += 0 if step_ok else 1
    return StepResult(
        state=new_state,
        skipped=skipped,
        table=functools.partial(host_table, new_state, raws, used, c.z),
        flags=functools.partial(list, [int(not step_ok), int(not used[0]), skipped]),
    )


def host_table(state: tuple[RowState, ...], raws: list[tuple[float, float]], used: list[bool], z: float) -> Table:
    """The host path's table, each row summarised when first read."""
    return _LazyRows(state, raws, used, z)


class _LazyRows(RowsView):
    """The host table, each row summarised when first read: reading the total skips the per-layer rows."""

    def __init__(self, state: tuple[RowState, ...], raws: list[tuple[float, float]], used: list[bool], z: float):
        self._args = (state, raws, used, z)
        self._rows: list[list[float] | None] = [None] * len(state)

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, i: int) -> list[float]:
        row = self._rows[i]
        if row is None:
            state, raws, used, z = self._args
            g, t = raws[i]
            row = self._rows[i] = summarize_row(state[i], g, t, used[i], z)
        return row


def _device_flags(step_ok: torch.Tensor, used: torch.Tensor, skipped: torch.Tensor) -> Flags:
    return torch.stack([(~step_ok).to(torch.int64), (~used[0]).to(torch.int64), skipped])


def state_to_rows(state: EMAState) -> tuple[RowState, ...]:
    """The host-path form of a device-path state (one host copy)."""
    sums = state.sums.detach().to("cpu", torch.float64).tolist()
    n = state.n.detach().to("cpu", torch.float64).tolist()
    w, w2, g, t, gg, tt, gt = sums
    return tuple(RowState(w[r], w2[r], g[r], t[r], gg[r], tt[r], gt[r], n[r]) for r in range(len(n)))


def rows_to_state(rows: Sequence[RowState], *, device: torch.device | str = "cpu") -> EMAState:
    """The device-path form of a host-path state."""
    sums = torch.tensor([[r.w, r.w2, r.g, r.t, r.gg, r.tt, r.gt] for r in rows], dtype=torch.float64).T
    n = torch.tensor([r.n for r in rows], dtype=torch.float64)
    return EMAState(sums=sums.contiguous().to(device), n=n.to(device))
