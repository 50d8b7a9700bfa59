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

import functools
from dataclasses import dataclass

import torch

__all__ = ["EMAState", "SmoothedMoments", "decay_for", "ema_init", "ema_moments", "ema_update"]


_FIELDS = ("w", "w2", "g", "t", "gg", "tt", "gt")


@dataclass(frozen=True)
class EMAState:
    """Weighted sums over past steps, packed as one ``(7, R)`` tensor so an update is a handful of kernels.

    Rows of ``sums`` (each also readable as an attribute of shape ``(R,)``):
        w: ``S1 = sum_t w_t``; zero until the row is first updated.
        w2: ``S2 = sum_t w_t^2``.
        g, t: weighted sums of the raw ``|G|^2`` and ``tr(Sigma)`` estimates.
        gg, tt, gt: weighted sums of their squares and of their product (for the band).

    Attributes:
        sums: the packed ``(7, R)`` weighted sums.
        n: ``(R,)`` number of steps folded in, per row.
    """

    sums: torch.Tensor
    n: torch.Tensor

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _FIELDS:
            return self.sums[_FIELDS.index(name)]
        raise AttributeError(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.clone(), "n": self.n.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> EMAState:
        return cls(sums=state["sums"].clone(), n=state["n"].clone())


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
    return EMAState(
        sums=torch.zeros(len(_FIELDS), rows, device=device, dtype=dtype),
        n=torch.zeros(rows, device=device, dtype=dtype),
    )


@functools.lru_cache(maxsize=64)
def _coefficient_columns(beta: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(7, 1)`` columns ``c`` and ``c2``: a used row decays by ``1 - c`` and gains ``c2 * x``.

    ``w2`` decays by ``beta^2`` and gains ``(1 - beta)^2``; every other row decays by ``beta``, gains ``1 - beta``.
    Cached: ``beta`` only changes when the batch size does.
    """
    a = 1.0 - beta
    c = torch.tensor([a, 1.0 - beta * beta] + [a] * 5, dtype=dtype).to(device).unsqueeze(1)
    c2 = torch.tensor([a, a * a] + [a] * 5, dtype=dtype).to(device).unsqueeze(1)
    return c, c2


# x = E[_LEFT] * E[_RIGHT] with E = [1, g, t] gives the rows 1, 1, g, t, g*g, t*t, g*t in four kernels.
_LEFT = (0, 0, 0, 0, 1, 2, 1)
_RIGHT = (0, 0, 1, 2, 1, 2, 2)


# central second moments E[xy] - E[x]E[y] pair the means (g, t) as (g, g), (t, t), (g, t)
_CENTRAL_LEFT = (0, 1, 0)
_CENTRAL_RIGHT = (0, 1, 1)


@functools.lru_cache(maxsize=16)
def _index(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The index tensors above, made once per device."""
    return tuple(torch.tensor(ix, device=device) for ix in (_LEFT, _RIGHT, _CENTRAL_LEFT, _CENTRAL_RIGHT))


def ema_update(
    state: EMAState, grad_sq: torch.Tensor, trace_cov: torch.Tensor, beta: float, mask: torch.Tensor
) -> EMAState:
    """Fold one step's raw estimates into the averages, for the rows where ``mask`` is true.

    Rows where ``mask`` is false (a skipped or undefined step) keep their state unchanged: no decay either, so a
    run of bad steps does not wash out the average.  Non-finite raw values in masked-out rows are ignored.
    About a dozen kernels whatever the number of rows; no host synchronisation.
    """
    sums = state.sums
    ones = torch.ones_like(sums[:1])
    e = torch.where(mask, torch.cat([ones, grad_sq.unsqueeze(0), trace_cov.unsqueeze(0)]).to(sums.dtype), 1.0)
    left, right, _, _ = _index(sums.device)
    x = e[left] * e[right]  # (7, R)
    m = mask.to(sums.dtype)
    c, c2 = _coefficient_columns(beta, sums.dtype, sums.device)
    return EMAState(sums=sums - (c * m) * sums + (c2 * m) * x, n=state.n + m)


def ema_moments(state: EMAState) -> SmoothedMoments:
    """Bias-corrected means and the variance of each mean.

    With normalised weights ``v_t = w_t / S1`` the unbiased weighted variance of the raw estimates is
    ``(sum v x^2 - xbar^2) / (1 - S2/S1^2)`` and the variance of the weighted mean is that times ``S2/S1^2``
    (independent steps).  Rows with fewer than two steps have infinite variance.
    """
    inv_w = state.sums[0].reciprocal()
    frac = state.sums[1] * inv_w * inv_w  # S2 / S1^2 = 1 / n_eff
    moments = state.sums[2:] * inv_w  # (5, R): means of g, t, gg, tt, gt
    mean_g, mean_t = moments[0], moments[1]
    _, _, c_left, c_right = _index(state.sums.device)
    central = moments[2:] - moments[c_left] * moments[c_right]  # E[gg] - E[g]^2, E[tt] - E[t]^2, E[gt] - E[g]E[t]
    ok = frac < 1.0 - 1e-12
    # unbiased weighted (co)variance of the raw estimates, times 1/n_eff: the variance of the weighted mean
    var = torch.where(ok, central * (frac / torch.where(ok, 1.0 - frac, 1.0)), float("inf"))
    var_g, var_t = var[0].clamp_min(0), var[1].clamp_min(0)
    cov = torch.where(ok, var[2], 0.0)
    return SmoothedMoments(
        grad_sq=mean_g,
        trace_cov=mean_t,
        var_grad_sq=var_g,
        var_trace_cov=var_t,
        cov=cov,
        n_eff=1.0 / frac,
    )
