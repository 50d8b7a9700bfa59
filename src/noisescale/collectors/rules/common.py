"""Small tensor helpers shared by the built-in norm rules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["affine_rule", "as_float", "flatten_sequence"]


def as_float(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32: squares of fp16 gradients overflow at ~256."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def flatten_sequence(t: torch.Tensor) -> torch.Tensor:
    """View ``(B, *positions, d)`` as ``(B, T, d)`` with ``T`` the product of the position dimensions."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def affine_rule(
    module: nn.Module,
    inputs: tuple[object, ...],
    sq_norms: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The rule of a layer with an optional ``weight`` and ``bias``: ``sq_norms(x) -> (weight, bias) norms``.

    Skips the work when neither parameter needs a gradient and returns only those that do.
    """
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    want_w = weight is not None and weight.requires_grad
    want_b = bias is not None and bias.requires_grad
    if not (want_w or want_b):
        return {}
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    w_sq, b_sq = sq_norms(x)
    out: dict[str, torch.Tensor] = {}
    if want_w:
        out["weight"] = w_sq
    if want_b:
        out["bias"] = b_sq
    return out
