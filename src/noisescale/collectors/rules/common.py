"""Small tensor helpers shared by the built-in norm rules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "affine_rule",
    "as_float",
    "bmm_float",
    "first_tensor",
    "flatten_sequence",
    "output_size",
    "rounding_tolerance",
]

_HALF = (torch.float16, torch.bfloat16)
_OUT_DTYPE_BMM: dict[str, bool] = {}  # device type -> whether bmm takes out_dtype for half inputs


def as_float(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32: squares of fp16 gradients overflow at ~256."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def bmm_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` in at least float32: half-precision inputs are multiplied as they are, summed in float32.

    A product of two fp16/bf16 numbers is exact in float32, so with float32 accumulation the result is what
    upcasting first would give, without the float32 copies of both operands; and it runs on the tensor cores.
    Where ``bmm`` has no ``out_dtype`` (CPUs), or the operands' dtypes differ, the operands are upcast.
    """
    if a.dtype not in _HALF and b.dtype not in _HALF:
        return torch.bmm(a, b)
    if a.dtype == b.dtype:
        kind = a.device.type
        if _OUT_DTYPE_BMM.get(kind, True):
            try:
                return torch.bmm(a, b, out_dtype=torch.float32)
            except torch.OutOfMemoryError:
                raise
            except (NotImplementedError, RuntimeError, TypeError):
                _OUT_DTYPE_BMM[kind] = False  # not on this device type: upcast from now on
    return torch.bmm(as_float(a), as_float(b))


def rounding_tolerance(dtype: torch.dtype, scale: float) -> float:
    """How far a recomputation may differ from a layer's own output of ``dtype`` whose terms are of size ``scale``.

    Eight units of rounding of ``dtype`` (bf16 keeps 8 bits), and at least of float32, in which libraries often
    compute whatever the input's dtype (Hugging Face's RMSNorms do): used by the first-call checks of recognised
    layers, which must tell other maths from rounding.
    """
    return 8 * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps) * (1.0 + scale)


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


def first_tensor(inputs: tuple[object, ...]) -> torch.Tensor:
    """A layer's first input, for a ``reference``; ``TypeError`` when it is not a tensor (another computation)."""
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor):
        raise TypeError("the first input is not a tensor")
    return x


def output_size(out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(out, its largest magnitude)``: a ``reference``'s answer for a layer whose output terms are that size."""
    return out, float(out.abs().max()) if out.numel() else 0.0
