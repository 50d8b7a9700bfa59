"""Per-example squared gradient norms of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

A convolution is a linear layer applied at every output position ``l``: with ``u_l`` the input patch read at
``l`` (``C_in/groups * K`` values, ``K`` the kernel volume) and ``g_l`` the output gradient there, one example's
weight gradient for group ``j`` is ``W_{i,j} = sum_l g_{l,j} u_{l,j}^T``, so

    |W_i|^2 = sum_j |G_{i,j}^T U_{i,j}|^2,      |b_i|^2 = |sum_l g_l|^2,

with ``U`` the ``(L, C_in/groups * K)`` patch matrix (im2col) and ``G`` the ``(L, C_out/groups)`` output
gradients.  Each group is a 3-D ``nn.Linear`` case over ``L`` positions, so the cheaper of the ghost form
``sum_{l,m} (u_l . u_m)(g_l . g_m)`` (``O(L^2 (C_in K + C_out))``) and the materialised per-example gradient
(``O(L C_out C_in K)``) is taken per call (``linear.sq_norm_of_sum_over_positions``).

Patches are cut after padding the input exactly as the layer does: ``padding`` given as numbers or as
``"same"`` (asymmetric when the total padding is odd: the extra goes after, as in PyTorch) or ``"valid"``, and
``padding_mode`` ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``; then strided, dilated windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.collectors.rules.common import as_float, first_tensor
from noisescale.collectors.rules.linear import sq_norm_of_sum_over_positions
from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.errors import UnsupportedLayerError

__all__ = ["conv_patches", "conv_reference", "conv_rule", "conv_weight_sq_norms"]


def _pad_amounts(
    padding: str | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dimension, as ``nn.Conv*d`` applies it."""
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    assert not isinstance(padding, str)
    return [(int(p), int(p)) for p in padding]


def conv_patches(
    x: torch.Tensor,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: str | Sequence[int],
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """The im2col patch matrix of an N-d convolution's input (N = 1, 2, 3, ...).

    Args:
        x: ``(B, C, *spatial)`` input.
        kernel_size, stride, dilation: one entry per spatial dimension.
        padding: per spatial dimension, or ``"same"`` / ``"valid"``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``(B, C * K, L)`` with ``K = prod(kernel_size)`` and ``L`` the number of output positions; the second
        dimension is ordered ``(c, k_1, ..., k_N)``, like a flattened conv weight ``(C_out, C, k_1, ..., k_N)``.
    """
    nd = len(kernel_size)
    pads = _pad_amounts(padding, kernel_size, dilation)
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dimension first
        x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    for i, (k, s, d) in enumerate(zip(kernel_size, stride, dilation, strict=True)):
        # Windows of the dilated span along spatial dim i, appended as a trailing dim; keep every d-th tap.
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    # (B, C, O_1..O_N, k_1..k_N) -> (B, C, k_1..k_N, O_1..O_N) -> (B, C*K, L); this reshape copies.
    b, c = x.shape[0], x.shape[1]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(b, c * math.prod(kernel_size), -1)


def conv_weight_sq_norms(patches: torch.Tensor, grad_output: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """Per-example ``sum_j |G_j^T U_j|^2`` over the ``groups`` groups of a convolution.

    Args:
        patches: ``(B, C_in * K, L)`` from ``conv_patches``.
        grad_output: ``(B, C_out, *out_spatial)`` with ``prod(out_spatial) = L``.
        groups: the layer's ``groups``.

    Returns:
        ``(B,)`` squared Frobenius norms of the per-example weight gradients.
    """
    b, ck, n_pos = patches.shape
    g = grad_output.reshape(b, grad_output.shape[1], -1)  # (B, C_out, L)
    if g.shape[2] != n_pos:
        raise ValueError(f"{n_pos} input patches but {g.shape[2]} output positions; the patches do not fit")
    # Group j owns input channels [j C_in/G, (j+1) C_in/G) (a contiguous block of the (c, k) rows) and the
    # matching block of output channels: fold the groups into the batch, positions into the sequence.
    u = patches.reshape(b * groups, ck // groups, n_pos).transpose(1, 2)  # (B G, L, C_in K / G)
    gg = g.reshape(b * groups, -1, n_pos).transpose(1, 2)  # (B G, L, C_out / G)
    return sq_norm_of_sum_over_positions(u, gg).view(b, groups).sum(dim=1)


def conv_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.Conv{1,2,3}d.forward`` outputs for ``inputs``, in float64, and the size of the terms it sums."""
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    x = first_tensor(inputs)
    bias = None if module.bias is None else module.bias.double()
    out = module._conv_forward(x.double(), module.weight.double(), bias)
    terms = module._conv_forward(x.double().abs(), module.weight.double().abs(), None)
    return out, float(terms.max()) + (float(bias.abs().max()) if bias is not None else 0.0)


@register_norm_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, reference=conv_reference)
def conv_rule(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example squared norms of ``weight`` and ``bias`` of ``nn.Conv{1,2,3}d`` (see the module docstring).

    Raises:
        UnsupportedLayerError: for an unbatched input (no leading batch dimension).
    """
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    want_w = module.weight.requires_grad
    want_b = module.bias is not None and module.bias.requires_grad
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    nd = len(module.kernel_size)
    if x.dim() != nd + 2:
        raise UnsupportedLayerError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example norms need a batched "
            f"input (B, C, <{nd} spatial dims>); unsqueeze(0) an unbatched example"
        )
    g = as_float(grad_output)
    out: dict[str, torch.Tensor] = {}
    if want_w:
        patches = conv_patches(
            as_float(x),
            kernel_size=module.kernel_size,
            stride=module.stride,
            dilation=module.dilation,
            padding=module.padding,
            padding_mode=module.padding_mode,
        )
        out["weight"] = conv_weight_sq_norms(patches, g, groups=module.groups)
    if want_b:
        out["bias"] = g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2).square().sum(dim=1)
    return out
