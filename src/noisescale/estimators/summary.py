"""From the smoothed state and this step's raw estimates to the table a ``Measurement`` shows.

Columns (``noisescale.types.COLUMNS``): smoothed B_simple = tr(Sigma)/|G|^2 (the ratio of the separately
smoothed numerator and denominator, McCandlish et al. 2018 App. A), its Fieller band, this step's raw ratio,
the smoothed ``|G|^2`` and ``tr(Sigma)``, and this step's raw ``|G|^2`` and ``tr(Sigma)``.  NaN marks a value
that is undefined (no data yet, zero gradient, non-positive raw ``|G|^2`` for the raw ratio).
"""

from __future__ import annotations

import torch

from noisescale.estimators.band import fieller_band
from noisescale.estimators.smoothing import EMAState, ema_moments

__all__ = ["summary_table"]


def summary_table(
    state: EMAState, grad_sq_raw: torch.Tensor, trace_cov_raw: torch.Tensor, used: torch.Tensor, z: float
) -> torch.Tensor:
    """The ``(R, 8)`` table of one step (pure; no host sync).

    Args:
        state: the smoothing state *after* this step.
        grad_sq_raw, trace_cov_raw: this step's unbiased estimates, ``(R,)``.
        used: ``(R,)`` whether this step's row entered the averages (finite, carrying signal).
        z: normal quantile of the band's confidence.
    """
    mom = ema_moments(state)
    nan = float("nan")
    defined = (state.n > 0) & (mom.grad_sq != 0)
    ratio = mom.trace_cov / mom.grad_sq
    # A smoothed |G|^2 below zero means the signal is within noise of zero: B_simple is unbounded.
    b_simple = torch.where(defined, torch.where(ratio < 0, float("inf"), ratio), nan)
    low, high = fieller_band(mom.trace_cov, mom.grad_sq, mom.var_trace_cov, mom.var_grad_sq, mom.cov, z)
    finite = torch.isfinite(grad_sq_raw) & torch.isfinite(trace_cov_raw)
    raw_ok = used & (grad_sq_raw > 0)
    b_raw = torch.where(raw_ok, trace_cov_raw / torch.where(raw_ok, grad_sq_raw, 1.0), nan)
    return torch.stack(
        [
            b_simple,
            torch.where(defined, low, nan),
            torch.where(defined, high, nan),
            b_raw,
            mom.grad_sq,
            mom.trace_cov,
            torch.where(finite, grad_sq_raw, nan),
            torch.where(finite, trace_cov_raw, nan),
        ],
        dim=1,
    )
