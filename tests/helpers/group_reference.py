"""Slow, obviously correct references for per-group statistics: per-example gradients in float64, summed by hand.

Every statistic is computed from its definition (``noisescale.estimators.groups``) with explicit sums of
per-example gradient vectors per group and per part (a backward pass on one rank), never through a Gram matrix.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["GroupReference", "flat_per_example_grads", "group_reference"]

GroupReference = dict[int, dict[str, float | None]]


def flat_per_example_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    params: Sequence[str] | None = None,
) -> torch.Tensor:
    """``(B, P)`` float64: each example's gradient of ``loss_fn(model(x_i), y_i).sum()``, flattened over ``params``
    (default: every trainable parameter)."""
    ref = copy.deepcopy(model).to(torch.float64)
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad and (params is None or n in params)]
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        xi = xi.to(torch.float64) if xi.is_floating_point() else xi
        loss = loss_fn(ref(xi), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, (_, p) in zip(grads, named)])
        )
    return torch.stack(rows)


def group_reference(parts: Sequence[torch.Tensor], groups: Sequence[Sequence[int]], batch_size: int) -> GroupReference:
    """Raw per-group values of one step from per-example gradients ``parts[p]`` ``(b_p, P)`` and their groups.

    Returns ``{group: {"examples", "grad_sq_raw", "trace_cov_raw", "share_raw", "alignment_raw", "spread"}}``
    (``None`` where undefined), plus the key ``-1`` holding ``{"spread_total", "mean_sq"}``.
    """
    ids = sorted({int(s) for part in groups for s in part})
    acc = {s: dict(n=0.0, sq=0.0, within=0.0, pairs=0.0, cross=0.0, cross_pairs=0.0, spread=0.0) for s in ids}
    for grads, part in zip(parts, groups, strict=True):
        b = grads.shape[0]
        total = grads.sum(0)
        mean = total / b
        for s in ids:
            members = [i for i, gid in enumerate(part) if int(gid) == s]
            if not members:
                continue
            gs = grads[members]
            group_sum = gs.sum(0)
            sq = float(gs.square().sum())
            n = len(members)
            a = acc[s]
            a["n"] += n
            a["sq"] += sq
            a["within"] += float(group_sum @ group_sum) - sq
            a["pairs"] += n * (n - 1)
            a["cross"] += float(group_sum @ total) - sq
            a["cross_pairs"] += n * (b - 1)
            if b >= 2:
                a["spread"] += (b / batch_size) / (b - 1) * float((gs - mean).square().sum())
    spread_total = sum(a["spread"] for a in acc.values())
    all_pairs = sum(a["cross_pairs"] for a in acc.values())
    mean_sq = sum(a["cross"] for a in acc.values()) / all_pairs if all_pairs else None
    out: GroupReference = {}
    for s, a in acc.items():
        grad_sq = a["within"] / a["pairs"] if a["pairs"] else None
        trace = a["sq"] / a["n"] - grad_sq if grad_sq is not None else None
        dot = a["cross"] / a["cross_pairs"] if a["cross_pairs"] else None
        cos = None
        if dot is not None and grad_sq is not None and mean_sq is not None and grad_sq > 0 and mean_sq > 0:
            cos = max(-1.0, min(1.0, dot / math.sqrt(grad_sq * mean_sq)))
        out[s] = {
            "examples": a["n"],
            "grad_sq_raw": grad_sq,
            "trace_cov_raw": trace,
            "share_raw": a["spread"] / spread_total if spread_total > 0 else None,
            "alignment_raw": cos,
            "spread": a["spread"],
        }
    out[-1] = {"spread_total": spread_total, "mean_sq": mean_sq}
    return out
