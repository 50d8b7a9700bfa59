"""Uncertainty band for B_simple = tr(Sigma) / |G|^2: Fieller's interval for a ratio of two means.

Given smoothed means ``T`` (of tr Sigma) and ``G`` (of |G|^2) with variances ``vT``, ``vG`` and covariance ``c``,
the ratio ``R`` is in the band when ``(T - R G)^2 <= z^2 (vT - 2 R c + R^2 vG)`` (Fieller 1954).  That is the
quadratic ``a R^2 - 2 b R + d <= 0`` with ``a = G^2 - z^2 vG``, ``b = T G - z^2 c``, ``d = T^2 - z^2 vT``.
When ``a <= 0`` the denominator is not distinguishable from zero and the band is unbounded above.  Unlike a
delta-method band it stays honest when ``|G|^2`` is small compared to its noise, which is the common case
(B_simple much larger than the batch).  B_simple is non-negative, so the lower end is clipped at zero.
"""

from __future__ import annotations

from statistics import NormalDist

import torch

__all__ = ["fieller_band", "z_for"]


def z_for(confidence: float) -> float:
    """Two-sided normal quantile: 1.645 for a 90% band."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def fieller_band(
    trace_cov: torch.Tensor,
    grad_sq: torch.Tensor,
    var_trace_cov: torch.Tensor,
    var_grad_sq: torch.Tensor,
    cov: torch.Tensor,
    z: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper ends of Fieller's band for ``trace_cov / grad_sq`` (vectorised; no host sync).

    Returns ``(0, inf)`` where the data cannot bound the ratio (too few steps, or ``|G|^2`` within noise of 0).
    """
    z2 = z * z
    a = grad_sq * grad_sq - z2 * var_grad_sq
    b = trace_cov * grad_sq - z2 * cov
    d = trace_cov * trace_cov - z2 * var_trace_cov
    disc = b * b - a * d
    # a > 0 and disc >= 0 (both finite) bound the band; NaN/inf compare false, so they fall to (0, inf).
    bounded = (a > 0) & (disc >= 0) & (disc < float("inf"))
    root = torch.where(bounded, disc, 0.0).sqrt()
    inv_a = torch.where(bounded, a, 1.0).reciprocal()
    low = torch.where(bounded, (b - root) * inv_a, 0.0).clamp_min(0)
    high = torch.where(bounded, (b + root) * inv_a, float("inf"))
    return low, high
