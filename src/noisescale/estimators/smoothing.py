"""Bias-corrected exponential moving averages of |G|^2 and tr(Sigma), smoothed separately.

The two-batch estimates of ``|G|^2`` and ``tr(Sigma)`` are unbiased but their ratio is not (Jensen), so the
numerator and the denominator are averaged separately and only then divided (McCandlish et al. 2018, App. A).

The time constant is counted in *examples*: a step of ``B`` examples decays the old average by
``beta = 0.5 ** (B / halflife)``, so the memory of the average does not change when the batch size does.
Weights are kept unnormalised (``S1 = sum_t w_t``, ``S2 = sum_t w_t^2``), which gives both the bias
correction (divide by ``S1``, as in Adam) and the effective number of samples ``S1^2 / S2`` used by the
uncertainty band.  Everything is a pure function of a frozen state, vectorised over rows (total, layers).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["EMAState", "SmoothedMoments", "decay_for", "ema_init", "ema_moments", "ema_update"]


@dataclass(frozen=True)
class EMAState:
    """Weighted sums over past steps, one entry per row (all tensors of shape ``(R,)``).

    Attributes:
        w: ``S1 = sum_t w_t``; zero until the row is first updated.
        w2: ``S2 = sum_t w_t^2``.
        g, t: weighted sums of the raw ``|G|^2`` and ``tr(Sigma)`` estimates.
        gg, tt, gt: weighted sums of their squares and of their product (for the band).
        n: number of steps folded in, per row.
    """

    w: torch.Tensor
    w2: torch.Tensor
    g: torch.Tensor
    t: torch.Tensor
    gg: torch.Tensor
    tt: torch.Tensor
    gt: torch.Tensor
    n: torch.Tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).clone() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> EMAState:
        return cls(**{f.name: state[f.name].clone() for f in fields(cls)})


@dataclass(frozen=True)
class SmoothedMoments:
    """Smoothed means and the variance of those means (shape ``(R,)``; NaN before a row's first update)."""

    grad_sq: torch.Tensor
    trace_cov: torch.Tensor
    var_grad_sq: torch.Tensor
    var_trace_cov: torch.Tensor
    cov: torch.Tensor
    n_eff: torch.Tensor


def decay_for(batch_size: int, halflife: float) -> float:
    """``beta = 0.5 ** (batch_size / halflife)``: the decay of one step of ``batch_size`` examples."""
    return 0.5 ** (batch_size / halflife)


def ema_init(rows: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> EMAState:
    """An empty state for ``rows`` independent averages."""
    z = torch.zeros(rows, device=device, dtype=dtype)
    return EMAState(w=z, w2=z, g=z, t=z, gg=z, tt=z, gt=z, n=z)


def ema_update(
    state: EMAState, grad_sq: torch.Tensor, trace_cov: torch.Tensor, beta: float, mask: torch.Tensor
) -> EMAState:
    """Fold one step's raw estimates into the averages, for the rows where ``mask`` is true.

    Rows where ``mask`` is false (a skipped or undefined step) keep their state unchanged: no decay either, so a
    run of bad steps does not wash out the average.  No host synchronisation.
    """
    g = torch.where(mask, grad_sq.to(state.g.dtype), torch.zeros_like(state.g))
    t = torch.where(mask, trace_cov.to(state.t.dtype), torch.zeros_like(state.t))
    b = torch.where(mask, torch.full_like(state.w, beta), torch.ones_like(state.w))
    a = torch.where(mask, torch.full_like(state.w, 1.0 - beta), torch.zeros_like(state.w))
    return replace(
        state,
        w=b * state.w + a,
        w2=b * b * state.w2 + a * a,
        g=b * state.g + a * g,
        t=b * state.t + a * t,
        gg=b * state.gg + a * g * g,
        tt=b * state.tt + a * t * t,
        gt=b * state.gt + a * g * t,
        n=state.n + mask.to(state.n.dtype),
    )


def ema_moments(state: EMAState) -> SmoothedMoments:
    """Bias-corrected means and the variance of each mean.

    With normalised weights ``v_t = w_t / S1`` the unbiased weighted variance of the raw estimates is
    ``(sum v x^2 - xbar^2) / (1 - S2/S1^2)`` and the variance of the weighted mean is that times ``S2/S1^2``
    (independent steps).  Rows with fewer than two steps have infinite variance.
    """
    w = state.w
    mean_g = state.g / w
    mean_t = state.t / w
    frac = state.w2 / (w * w)  # = 1 / n_eff
    denom = 1.0 - frac
    ok = denom > 1e-12
    safe = torch.where(ok, denom, torch.ones_like(denom))
    inf = torch.full_like(w, float("inf"))
    var_g = torch.where(ok, (state.gg / w - mean_g * mean_g) / safe * frac, inf)
    var_t = torch.where(ok, (state.tt / w - mean_t * mean_t) / safe * frac, inf)
    cov = torch.where(ok, (state.gt / w - mean_g * mean_t) / safe * frac, torch.zeros_like(w))
    return SmoothedMoments(
        grad_sq=mean_g,
        trace_cov=mean_t,
        var_grad_sq=var_g.clamp_min(0),
        var_trace_cov=var_t.clamp_min(0),
        cov=cov,
        n_eff=1.0 / frac,
    )
