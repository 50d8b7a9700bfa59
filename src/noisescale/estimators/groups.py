"""Noise statistics of groups of examples (data sources) from per-example gradient Gram matrices.

Notation: ``g_i`` is example ``i``'s gradient in the monitor's units (the gradient of its own loss when the loss is
a mean), ``s`` a group, ``p`` a *part* (one backward pass on one rank) of ``b_p`` examples, ``B = sum_p b_p`` the
step's batch, and ``K^p_ij = <g_i, g_j>`` for ``i, j`` in ``p`` (``collectors.groups``).  Pairs of examples are only
formed inside a part.  Per group and step, additive over parts and ranks (``part_sums``):

* ``n_s`` examples, ``A_s = sum_i |g_i|^2``;
* ``P_s = sum_p sum_{i != j in s and p} <g_i, g_j>`` over ``N_s = sum_p n_s^p (n_s^p - 1)`` ordered pairs;
* ``Q_s = sum_p sum_{i in s and p, j in p, j != i} <g_i, g_j>`` over ``M_s = sum_p n_s^p (b_p - 1)`` pairs;
* ``D_s = sum_p (b_p / B) / (b_p - 1) sum_{i in s and p} |g_i - mean_p g|^2``, the group's part of the spread.

Estimates (unbiased for independent examples; a U-statistic over the pairs inside parts):

* the group's own ``|G_s|^2 ~ P_s / N_s`` (its mean gradient ``mu_s``), ``tr(Sigma_s) ~ A_s / n_s - P_s / N_s``
  and ``B_simple,s`` = their ratio.  With one part this is exactly the two-batch estimator of McCandlish et al.
  (2018, App. A) with the group's examples as the small batches and their sum as the big one;
* its share of ``tr(Sigma)``: ``D_s / sum_s D_s``.  With one part ``sum_s D_s = (1 / (B - 1)) sum_i |g_i -
  mean g|^2`` is the monitor's own ``tr(Sigma)`` estimate, so the groups split it exactly, each part
  non-negative; in expectation the share is ``w_s E_s|g - mu|^2 / tr(Sigma)`` with ``w_s`` the group's fraction
  of the batch and ``mu`` the batch's mean gradient (within-group noise plus the group's offset from the mean);
* its alignment: ``cos(mu_s, mu) = (Q_s / M_s) / sqrt((P_s / N_s) (Q / M))`` with ``Q = sum_s Q_s``, ``M =
  sum_s M_s`` (``Q / M`` estimates ``|mu|^2``).

Each is smoothed like the monitor's value: numerator and denominator separately (half-life in examples), with
Fieller's band for the ratio (``band``).  Four rows per group, each a ``(denominator, numerator)`` pair:
``own`` (``|G_s|^2``, ``tr Sigma_s``), ``share`` (``sum D``, ``D_s``), ``proj`` (``|mu|^2``, ``<mu_s, mu>``) and
``rel`` (``|mu|^2``, ``|mu_s|^2``); the alignment is ``proj / sqrt(rel)``, and its band the range of that over the
two rows' bands, each at the confidence that makes the pair's joint coverage the nominal one (Bonferroni).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from noisescale.estimators.scalar import RowState, update_row
from noisescale.estimators.smoothing import EMAState, ema_init, ema_update
from noisescale.group_types import GROUP_FIELDS

__all__ = [
    "FEATURES",
    "GROUP_COLUMNS",
    "KINDS",
    "GroupSmoother",
    "group_rows",
    "part_sums",
    "part_sums_host",
]

FEATURES = ("n", "sq", "within", "within_pairs", "cross", "cross_pairs", "spread")
"""Rows of ``part_sums``: ``n_s, A_s, P_s, N_s, Q_s, M_s, D_s`` (see the module docstring)."""
KINDS = ("own", "share", "proj", "rel")
GROUP_COLUMNS = GROUP_FIELDS
"""The numbers of one group at one step (``noisescale.group_types.GroupMeasurement``), in order."""

_NAN = float("nan")
_INF = float("inf")


def part_sums(gram: torch.Tensor, slots: torch.Tensor, n_groups: int, batch_size: int) -> torch.Tensor:
    """The additive statistics of one part, per group: ``(len(FEATURES), n_groups)`` float64.

    Args:
        gram: ``(b, b)`` per-example gradient Gram matrix of the part, in the monitor's units.
        slots: ``(b,)`` the group slot (``0 <= slot < n_groups``) of each example.
        n_groups: the number of group slots.
        batch_size: ``B``, the examples of the whole step (all parts, all ranks).
    """
    k = gram.to(torch.float64)
    b = k.shape[0]
    onehot = torch.zeros(b, n_groups, dtype=torch.float64, device=k.device)
    onehot[torch.arange(b, device=k.device), slots.to(k.device)] = 1.0
    n = onehot.sum(0)
    diag = k.diagonal()
    row = k.sum(1)  # (b,): <g_i, sum_j g_j>
    sq = diag @ onehot  # A_s
    to_all = row @ onehot  # <sum_{i in s} g_i, sum_j g_j>
    own = ((k @ onehot) * onehot).sum(0)  # |sum_{i in s} g_i|^2
    total = row.sum()  # |sum_j g_j|^2
    if b >= 2:
        # sum_{i in s} |g_i - mean|^2 = A_s - 2 <G_s, sum> / b + n_s |sum|^2 / b^2, weighted by (b / B) / (b - 1)
        spread = (sq - 2.0 * to_all / b + n * total / (b * b)) * (b / batch_size / (b - 1))
    else:
        spread = torch.zeros_like(n)
    return torch.stack([n, sq, own - sq, n * (n - 1), to_all - sq, n * (b - 1), spread])


def part_sums_host(gram: torch.Tensor, slots: torch.Tensor, n_groups: int, batch_size: int) -> list[list[float]]:
    """``part_sums`` for a Gram matrix in host memory, as Python floats: three products, then a few dozen floats
    (tiny tensor operations cost more than that arithmetic on a CPU)."""
    k = gram.to(torch.float64)
    onehot = torch.nn.functional.one_hot(slots, n_groups).to(torch.float64)  # (b, S)
    cross = (onehot.T @ (k @ onehot)).tolist()  # (S, S): <sum_{i in s} g_i, sum_{j in t} g_j>
    sq = (k.diagonal() @ onehot).tolist()
    n = onehot.sum(0).tolist()
    b = k.shape[0]
    to_all = [sum(row) for row in cross]
    total = sum(to_all)
    weight = b / batch_size / (b - 1) if b >= 2 else 0.0
    return [
        n,
        sq,
        [cross[s][s] - sq[s] for s in range(n_groups)],
        [m * (m - 1) for m in n],
        [to_all[s] - sq[s] for s in range(n_groups)],
        [m * (b - 1) for m in n],
        [(sq[s] - 2.0 * to_all[s] / b + n[s] * total / (b * b)) * weight for s in range(n_groups)],
    ]


def group_rows(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's raw ``(denominator, numerator)`` of every row and whether it is used, from ``part_sums`` totals.

    Args:
        sums: ``(len(FEATURES), S)`` summed over the step's parts (and ranks).

    Returns:
        ``(g, t, used)``, each ``(4 S,)``: rows ``4 s + k`` for group ``s`` and kind ``KINDS[k]``.  A row is used
        when its pairs exist (a group with fewer than two examples in every part has no ``own`` row that step;
        its share, zero when it is absent, always counts) and every number is finite.
    """
    n, sq, within, within_pairs, cross, cross_pairs, spread = sums
    has_pairs = within_pairs > 0
    has_cross = cross_pairs > 0
    all_pairs = cross_pairs.sum()
    mean_sq = torch.where(all_pairs > 0, cross.sum() / torch.where(all_pairs > 0, all_pairs, 1.0), _NAN)
    grad_sq = torch.where(has_pairs, within / torch.where(has_pairs, within_pairs, 1.0), _NAN)
    trace = torch.where(has_pairs, sq / torch.where(n > 0, n, 1.0) - grad_sq, _NAN)
    dot = torch.where(has_cross, cross / torch.where(has_cross, cross_pairs, 1.0), _NAN)
    spread_total = spread.sum().expand_as(spread)
    g = torch.stack([grad_sq, spread_total, mean_sq.expand_as(n), mean_sq.expand_as(n)], dim=1).reshape(-1)
    t = torch.stack([trace, spread, dot, grad_sq], dim=1).reshape(-1)
    any_pairs = (all_pairs > 0).expand_as(n)
    used = torch.stack([has_pairs, any_pairs, has_cross & any_pairs, has_pairs & any_pairs], dim=1).reshape(-1)
    used = used & torch.isfinite(g) & torch.isfinite(t)
    return g, t, used


def _group_rows_host(sums: list[list[float]]) -> tuple[list[float], list[float], list[bool]]:
    """``group_rows`` on Python floats (the host path: a few dozen numbers, cheaper than tensor operations)."""
    n, sq, within, within_pairs, cross, cross_pairs, spread = sums
    all_pairs = sum(cross_pairs)
    mean_sq = sum(cross) / all_pairs if all_pairs > 0 else _NAN
    spread_total = sum(spread)
    g: list[float] = []
    t: list[float] = []
    used: list[bool] = []
    for s in range(len(n)):
        pairs = within_pairs[s] > 0
        grad_sq = within[s] / within_pairs[s] if pairs else _NAN
        trace = sq[s] / n[s] - grad_sq if pairs else _NAN
        dot = cross[s] / cross_pairs[s] if cross_pairs[s] > 0 else _NAN
        g += [grad_sq, spread_total, mean_sq, mean_sq]
        t += [trace, spread[s], dot, grad_sq]
        used += [pairs, all_pairs > 0, cross_pairs[s] > 0 and all_pairs > 0, pairs and all_pairs > 0]
    used = [u and math.isfinite(a) and math.isfinite(b) for u, a, b in zip(used, g, t, strict=True)]
    return g, t, used


class GroupSmoother:
    """The smoothing state of every group's rows, on the host (floats) or on a device (``EMAState``).

    Rows are added as new groups appear; a row not used in a step keeps its state (no decay), as in the monitor.

    Args:
        z: normal quantile of the band of ``own`` and ``share`` (the monitor's confidence).
        z_pair: normal quantile of each of ``proj`` and ``rel``, whose joint coverage is the nominal one.
        path: ``"auto"`` (Python floats for sums in host memory, tensors on their device otherwise), or force
            ``"host"`` / ``"device"`` (tests hold the two to each other).
    """

    def __init__(self, z: float, z_pair: float, *, path: Literal["auto", "host", "device"] = "auto") -> None:
        self.z = z
        self.z_pair = z_pair
        self.path = path
        self._host: list[RowState] = []
        self._device: EMAState | None = None

    @property
    def n_rows(self) -> int:
        return self._device.n.shape[0] if self._device is not None else len(self._host)

    def step(self, sums: torch.Tensor | list[list[float]], beta: float) -> Callable[[], list[list[float]]]:
        """Fold one step's per-group sums (``part_sums`` totals, one column per group slot) into the rows, growing
        the state as new groups appear; returns a thunk that builds the ``(S, len(GROUP_COLUMNS))`` table of the
        state as it is now (a device state is read back, one copy, only when the thunk runs)."""
        if isinstance(sums, list) or self.path == "host" or (self.path == "auto" and sums.device.type == "cpu"):
            g, t, used = _group_rows_host(sums if isinstance(sums, list) else sums.tolist())
            if self._device is not None:
                self._host = _to_rows(self._device)
                self._device = None
            self._host += [RowState() for _ in range(len(g) - len(self._host))]
            for i, (gi, ti, ui) in enumerate(zip(g, t, used, strict=True)):
                if ui:
                    self._host[i] = update_row(self._host[i], gi, ti, beta)
            host = list(self._host)
            return functools.partial(self._table, host, g, t, used)
        g_t, t_t, used_t = group_rows(
            sums if isinstance(sums, torch.Tensor) else torch.tensor(sums, dtype=torch.float64)
        )
        rows = g_t.shape[0]
        state = self._device
        if state is None:
            state = _to_state(self._host, sums.device) if self._host else ema_init(0, device=sums.device)
            self._host = []
        if state.n.shape[0] < rows:
            grow = ema_init(rows - state.n.shape[0], device=sums.device)
            state = EMAState(sums=torch.cat([state.sums, grow.sums], 1), n=torch.cat([state.n, grow.n]))
        self._device = state = ema_update(state, g_t, t_t, beta, used_t)

        def build() -> list[list[float]]:
            return self._table(_to_rows(state), g_t.tolist(), t_t.tolist(), used_t.tolist())

        return build

    def _table(self, rows: Sequence[RowState], g: list[float], t: list[float], used: list[bool]) -> list[list[float]]:
        return [
            self._group(rows[i : i + 4], g[i : i + 4], t[i : i + 4], used[i : i + 4]) for i in range(0, len(rows), 4)
        ]

    def _group(
        self, rows: Sequence[RowState], g: Sequence[float], t: Sequence[float], used: Sequence[bool]
    ) -> list[float]:
        own, share, proj, rel = (_moments(r) for r in rows)
        # own: B_simple of the group, clipped at 0 like the monitor's (a negative smoothed |G_s|^2 means unbounded)
        b, b_low, b_high = _ratio(own, self.z, clip=True)
        s, s_low, s_high = _ratio(share, self.z, clip=True)
        p, p_low, p_high = _ratio(proj, self.z_pair, clip=False)
        q, q_low, q_high = _ratio(rel, self.z_pair, clip=True)
        cos, cos_low, cos_high = _alignment(p, p_low, p_high, q, q_low, q_high)
        raw = [ti / gi if ui and gi > 0 else _NAN for gi, ti, ui in zip(g, t, used, strict=True)]
        cos_raw = _NAN
        if used[2] and used[3] and g[2] > 0 and t[3] > 0:
            cos_raw = max(-1.0, min(1.0, t[2] / math.sqrt(t[3] * g[2])))
        share_raw = raw[1] if used[1] else _NAN
        if used[1] and g[1] == 0:
            share_raw = _NAN
        own_g_raw = g[0] if used[0] else _NAN
        own_t_raw = t[0] if used[0] else _NAN
        return [
            s, s_low, s_high, share_raw,
            b, b_low, b_high, raw[0],
            own[0], own[1], own_g_raw, own_t_raw,
            cos, cos_low, cos_high, cos_raw,
        ]  # fmt: skip

    # -- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        rows = _to_rows(self._device) if self._device is not None else self._host
        return {"rows": [list(r) for r in rows]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        rows = state["rows"]
        assert isinstance(rows, list)
        self._host = [RowState(*r) for r in rows]
        self._device = None


def _to_rows(state: EMAState) -> list[RowState]:
    sums = state.sums.detach().to("cpu", torch.float64).tolist()
    n = state.n.detach().to("cpu", torch.float64).tolist()
    w, w2, g, t, gg, tt, gt = sums
    return [RowState(w[r], w2[r], g[r], t[r], gg[r], tt[r], gt[r], n[r]) for r in range(len(n))]


def _to_state(rows: Sequence[RowState], device: torch.device) -> EMAState:
    sums = torch.tensor([[r.w, r.w2, r.g, r.t, r.gg, r.tt, r.gt] for r in rows], dtype=torch.float64).T
    n = torch.tensor([r.n for r in rows], dtype=torch.float64)
    return EMAState(sums=sums.contiguous().to(device), n=n.to(device))


def _moments(r: RowState) -> tuple[float, float, float, float, float]:
    """Smoothed ``(g, t)``, their variances and covariance (of the means), as ``smoothing.ema_moments``."""
    if r.w == 0.0:
        return _NAN, _NAN, _INF, _INF, 0.0
    g, t = r.g / r.w, r.t / r.w
    frac = r.w2 / (r.w * r.w)
    if frac >= 1.0 - 1e-12:
        return g, t, _INF, _INF, 0.0
    scale = frac / (1.0 - frac)
    var_g = max((r.gg / r.w - g * g) * scale, 0.0)
    var_t = max((r.tt / r.w - t * t) * scale, 0.0)
    return g, t, var_g, var_t, (r.gt / r.w - g * t) * scale


def _ratio(m: tuple[float, float, float, float, float], z: float, *, clip: bool) -> tuple[float, float, float]:
    """Smoothed ``t / g`` and Fieller's band (``band``); with ``clip``, a quantity known to be >= 0 (an
    undefined-sign denominator gives ``inf`` as the monitor's B_simple does)."""
    g, t, var_g, var_t, cov = m
    if math.isnan(g) or g == 0.0:
        return _NAN, _NAN, _NAN
    ratio = t / g
    if clip and ratio < 0:
        ratio = _INF
    z2 = z * z
    a = g * g - z2 * var_g
    bb = t * g - z2 * cov
    d = t * t - z2 * var_t
    disc = bb * bb - a * d
    if not (a > 0 and 0 <= disc < _INF):
        return ratio, (0.0 if clip else -_INF), _INF
    root = math.sqrt(disc)
    low, high = (bb - root) / a, (bb + root) / a
    return ratio, (max(low, 0.0) if clip else low), high


def _alignment(
    p: float, p_low: float, p_high: float, q: float, q_low: float, q_high: float
) -> tuple[float, float, float]:
    """``p / sqrt(q)`` clipped to [-1, 1], and its range over the box ``[p_low, p_high] x [q_low, q_high]``."""
    if math.isnan(p) or math.isnan(q) or not (0 < q < _INF):
        return _NAN, _NAN, _NAN
    cos = max(-1.0, min(1.0, p / math.sqrt(q)))
    corners = [_cos(pp, qq) for pp in (p_low, p_high) for qq in (q_low, q_high)]
    low = max(-1.0, min(corners))
    high = min(1.0, max(corners))
    return cos, low, high


def _cos(p: float, q: float) -> float:
    """``p / sqrt(q)`` at a corner of the band box: ``q = 0`` sends a non-zero ``p`` to its sign's infinity."""
    if q <= 0:
        return 0.0 if p == 0 else math.copysign(_INF, p)
    if q == _INF:
        return 0.0
    if math.isinf(p):
        return p
    return p / math.sqrt(q)
