"""Slow, obviously correct references for the collectors: one autograd call per example or micro-batch, float64.

Nothing here is clever on purpose: each function copies the model to float64 and differentiates a loss that
involves only the examples in question, so the fast paths in ``noisescale.collectors`` are checked against
plain ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["PerExampleLoss", "double_model", "microbatch_mean_grad_sq_norms", "per_example_sq_norms"]

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(output, target) -> (B,)`` loss of each example."""


def double_model(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` (same values, no hooks shared with the original)."""
    return copy.deepcopy(model).to(torch.float64)


def _double(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t


def _sq_norm(g: torch.Tensor | None) -> torch.Tensor:
    if g is None:
        return torch.zeros((), dtype=torch.float64)
    if g.is_sparse:
        g = g.to_dense()
    return g.to(torch.float64).square().sum()


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_example_sq_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerExampleLoss
) -> dict[str, torch.Tensor]:
    """``|d loss_fn(model(x_i), y_i) / d p|^2`` for every example ``i`` and trainable parameter ``p``.

    Returns:
        ``{param_name: (B,) float64}``, in ``model.named_parameters()`` order.
    """
    ref = double_model(model)
    params = _trainable(ref)
    rows: list[list[torch.Tensor]] = []
    for i in range(x.shape[0]):
        loss = loss_fn(ref(_double(x[i : i + 1])), _double(y[i : i + 1])).sum()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        rows.append([_sq_norm(g) for g in grads])
    return {name: torch.stack([r[j] for r in rows]) for j, (name, _) in enumerate(params)}


def microbatch_mean_grad_sq_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerExampleLoss, sizes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """``|mean_{i in j} grad_i|^2`` for each consecutive micro-batch ``j`` of ``sizes`` and trainable parameter.

    Returns:
        ``{param_name: (k,) float64}``.
    """
    ref = double_model(model)
    params = _trainable(ref)
    rows: list[list[torch.Tensor]] = []
    for xj, yj in zip(torch.split(x, list(sizes)), torch.split(y, list(sizes)), strict=True):
        loss = loss_fn(ref(_double(xj)), _double(yj)).mean()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        rows.append([_sq_norm(g) for g in grads])
    return {name: torch.stack([r[j] for r in rows]) for j, (name, _) in enumerate(params)}
