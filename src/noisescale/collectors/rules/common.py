"""Small tensor helpers shared by the built-in norm rules."""

from __future__ import annotations

import torch

__all__ = ["as_float", "flatten_sequence"]


def as_float(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32: squares of fp16 gradients overflow at ~256."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def flatten_sequence(t: torch.Tensor) -> torch.Tensor:
    """View ``(B, *positions, d)`` as ``(B, T, d)`` with ``T`` the product of the position dimensions."""
    return t.reshape(t.shape[0], -1, t.shape[-1])
