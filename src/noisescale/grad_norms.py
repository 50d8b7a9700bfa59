"""Squared norms of accumulated gradients ``|p.grad|^2``: the big batch of the two-batch estimator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["grad_sq_norms", "sq_norms"]


def sq_norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``|t|^2`` of each tensor as float64 ``(n,)`` on ``device``, by one fused ``_foreach_norm``.

    Half-precision gradients are reduced in float32: an fp16 norm overflows at 65504.
    """
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32 if low else None)
    if all(n.dtype == norms[0].dtype and n.device == norms[0].device for n in norms):
        return torch.stack(norms).to(device=device, dtype=torch.float64).square()
    # parameters of mixed dtypes or devices
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]).square()


def grad_sq_norms(params: Sequence[nn.Parameter], device: torch.device) -> torch.Tensor:
    """``|p.grad|^2`` per parameter as float64 ``(P,)``; zero where a parameter got no gradient."""
    grads = [p.grad for p in params]
    present = [g.detach() for g in grads if g is not None]
    if not present:
        return torch.zeros(len(params), dtype=torch.float64, device=device)
    sq = sq_norms(present, device)
    if len(present) == len(grads):
        return sq
    out = torch.zeros(len(params), dtype=torch.float64, device=device)
    out[[i for i, g in enumerate(grads) if g is not None]] = sq
    return out
