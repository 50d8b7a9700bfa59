"""The unbiased two-batch estimator of |G|^2 and tr(Sigma) (McCandlish et al. 2018, App. A).

For a mean gradient ``G_b`` over ``b`` examples drawn independently, ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``.
Measuring the squared norm at two batch sizes gives two equations in the two unknowns.  With ``k`` small
batches of sizes ``b_j`` (possibly unequal) and the big batch of ``B`` examples, average the small ones:
``E[mean_j |G_j|^2] = |G|^2 + tr(Sigma) * mean_j(1/b_j)``, so, writing ``S = mean_j |G_j|^2`` and
``h = mean_j (1 / b_j)``::

    tr(Sigma) ~ (S - |G_B|^2) / (h - 1/B)
    |G|^2     ~ |G_B|^2 - tr(Sigma) / B  = (|G_B|^2 h - S / B) / (h - 1/B)

Both are unbiased.  Their ratio B_simple = tr(Sigma) / |G|^2 is not: smooth them separately, then divide
(``noisescale.estimators.smoothing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TwoBatchEstimate", "two_batch_coefficients", "two_batch_estimate", "two_batch_from_sums"]


@dataclass(frozen=True)
class TwoBatchEstimate:
    """Unbiased estimates from one step (tensors of matching shape; one entry per row if vectorised).

    Attributes:
        grad_sq: estimate of ``|G|^2``; may be negative when noise dominates (it is unbiased, not clipped).
        trace_cov: estimate of ``tr(Sigma)``, the trace of the per-example gradient covariance.
    """

    grad_sq: torch.Tensor
    trace_cov: torch.Tensor

    @property
    def b_simple(self) -> torch.Tensor:
        """``trace_cov / grad_sq`` for this step alone (noisy and biased; NaN where ``grad_sq <= 0``)."""
        return torch.where(self.grad_sq > 0, self.trace_cov / self.grad_sq, torch.full_like(self.grad_sq, float("nan")))


def two_batch_coefficients(n_small: int, inv_size_sum: float, big_size: int) -> tuple[float, float, float, float]:
    """The estimator as a linear map of ``S = sum_j |G_j|^2`` and ``|G_B|^2``.

    With ``h = inv_size_sum / k`` and ``gap = h - 1/B``::

        tr(Sigma) = S / (k gap) - |G_B|^2 / gap
        |G|^2     = |G_B|^2 - tr(Sigma) / B

    Returns:
        ``(tr_s, tr_b, g_s, g_b)`` such that ``tr(Sigma) = tr_s S + tr_b |G_B|^2`` and
        ``|G|^2 = g_s S + g_b |G_B|^2``.

    Raises:
        ValueError: if the small batches are not smaller on average than the big one.
    """
    mean_inv = inv_size_sum / n_small
    gap = mean_inv - 1.0 / big_size
    if not gap > 0:
        raise ValueError(
            f"the small batches must be smaller on average than the big batch: mean(1/b_j)={mean_inv:.6g} must "
            f"exceed 1/B={1.0 / big_size:.6g}; use at least two small batches"
        )
    tr_s, tr_b = 1.0 / (n_small * gap), -1.0 / gap
    return tr_s, tr_b, -tr_s / big_size, 1.0 - tr_b / big_size


def two_batch_from_sums(
    small_sq_sum: torch.Tensor,
    n_small: int,
    inv_size_sum: float,
    big_sq_norm: torch.Tensor,
    big_size: int,
) -> TwoBatchEstimate:
    """The two-batch estimator from additive statistics; vectorised over any leading shape.

    Args:
        small_sq_sum: ``sum_j |G_j|^2`` over the ``k`` small batches (per row).
        n_small: ``k``.
        inv_size_sum: ``sum_j 1 / b_j``.
        big_sq_norm: ``|G_B|^2`` (per row).
        big_size: ``B``.

    Returns:
        The unbiased ``|G|^2`` and ``tr(Sigma)`` (see the module docstring and ``two_batch_coefficients``).
    """
    tr_s, tr_b, g_s, g_b = two_batch_coefficients(n_small, inv_size_sum, big_size)
    return TwoBatchEstimate(
        grad_sq=g_s * small_sq_sum + g_b * big_sq_norm,
        trace_cov=tr_s * small_sq_sum + tr_b * big_sq_norm,
    )


def two_batch_estimate(
    small_sq_norms: torch.Tensor | Sequence[float],
    small_sizes: torch.Tensor | Sequence[int] | int,
    big_sq_norm: torch.Tensor | float,
    big_size: int,
) -> TwoBatchEstimate:
    """Unbiased |G|^2 and tr(Sigma) from small-batch and big-batch squared gradient norms.

    Implements McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"), App. A, generalised to
    ``k >= 1`` small batches of unequal sizes ``b_j``::

        tr(Sigma) ~ (mean_j |G_j|^2 - |G_B|^2) / (mean_j (1/b_j) - 1/B)
        |G|^2     ~ |G_B|^2 - tr(Sigma) / B

    Args:
        small_sq_norms: ``(k,)`` or ``(k, ...)``: squared norms ``|G_j|^2`` of the small batches' *mean*
            gradients (extra dimensions, e.g. one per layer, are estimated independently).
        small_sizes: ``(k,)`` sizes ``b_j``, or one int for all.
        big_sq_norm: ``|G_B|^2`` of the big batch's mean gradient (shape of ``small_sq_norms[0]``).
        big_size: ``B``, the number of examples in the big batch.

    Returns:
        A ``TwoBatchEstimate`` with ``grad_sq``, ``trace_cov`` and ``b_simple``.

    Raises:
        ValueError: for empty input, non-positive sizes, mismatched lengths, or small batches that are not
            smaller on average than the big one.

    Example:
        >>> import torch, noisescale as ns
        >>> est = ns.two_batch_estimate(torch.tensor([3.0, 5.0]), [1, 1], big_sq_norm=2.0, big_size=2)
        >>> float(est.trace_cov), float(est.grad_sq)
        (4.0, 0.0)
    """
    small = torch.as_tensor(small_sq_norms)
    if not small.is_floating_point():
        small = small.to(torch.get_default_dtype())
    if small.dim() == 0 or small.shape[0] == 0:
        raise ValueError(f"small_sq_norms must hold at least one small batch, got shape {tuple(small.shape)}")
    k = small.shape[0]
    if isinstance(small_sizes, int):
        sizes = torch.full((k,), float(small_sizes), dtype=torch.float64)
    else:
        sizes = torch.as_tensor(small_sizes, dtype=torch.float64).reshape(-1)
    if sizes.shape[0] != k:
        raise ValueError(f"small_sizes has {sizes.shape[0]} entries but small_sq_norms has {k} small batches")
    if bool((sizes <= 0).any()) or big_size <= 0:
        raise ValueError(f"batch sizes must be positive, got small_sizes={sizes.tolist()} and big_size={big_size}")
    big = torch.as_tensor(big_sq_norm, dtype=small.dtype, device=small.device)
    return two_batch_from_sums(small.sum(0), k, float((1.0 / sizes).sum()), big, int(big_size))
