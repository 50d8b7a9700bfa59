"""Per-example squared gradient norms of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

A convolution is a linear layer applied at every output position ``l``: with ``u_l`` the input patch read at
``l`` (``C_in/groups * K`` values, ``K`` the kernel volume) and ``g_l`` the output gradient there, one example's
weight gradient for group ``j`` is ``W_{i,j} = sum_l g_{l,j} u_{l,j}^T``, so

    |W_i|^2 = sum_j |G_{i,j}^T U_{i,j}|^2,      |b_i|^2 = |sum_l g_l|^2,

with ``U`` the ``(L, C_in/groups * K)`` patch matrix (im2col) and ``G`` the ``(L, C_out/groups)`` output
gradients.  Each group is a 3-D ``nn.Linear`` case over ``L`` positions, and the cheapest form is taken per call:

* a 1x1 convolution is a Linear over the positions: its input and output gradient go to the Linear forms as
  they are, no patches cut;
* materialised (``O(L C_out C_in K / groups)``, the usual case for convolutions): on a CPU the per-example weight
  gradients come straight from the convolution's own weight-gradient kernel, run once over the batch folded into
  the groups (``groups * B`` groups of one example each), so no im2col copy is made (one thread: 2.1 against
  4.6 ms for unfolding and multiplying on the digits CNN's second layer, 10 against 31 ms on the U-Net
  denoiser's 32-channel 16x16 layer, at best of 12; still 1.4-2.6 times the layer's own weight gradient, whose one
  large product runs faster than many small ones); elsewhere, and for the ghost form, from the patch matrix;
* ghost ``sum_{l,m} (u_l . u_m)(g_l . g_m)`` (``O(L^2 (C_in K + C_out))``), for few positions and wide layers;
* with ``GNSMonitor(sketch=k)``, an unbiased estimate from ``k`` random kernels: the input convolved with them
  is the patches times a random projection, again without im2col (``rules.sketch``), where it costs at most half
  as much as the exact form.

Each form works in chunks of examples beyond ``linear_forms.MAX_BUFFER`` elements.  Patches are cut after padding
the input exactly as the layer does: ``padding`` given as numbers or as ``"same"`` (asymmetric when the total
padding is odd: the extra goes after, as in PyTorch) or ``"valid"``, and ``padding_mode`` ``"zeros"``,
``"reflect"``, ``"replicate"`` or ``"circular"``; then strided, dilated windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.collectors.rules import linear_forms
from noisescale.collectors.rules.common import as_float, first_tensor
from noisescale.collectors.rules.linear import sequence_linear_sq_norms, sq_norm_of_sum_over_positions
from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.collectors.rules.sketch import PAYS, Sketch, current_sketch
from noisescale.errors import UnsupportedLayerError

__all__ = [
    "conv_grouped_weight_sq_norms",
    "conv_layer_weight_sq_norms",
    "conv_patches",
    "conv_reference",
    "conv_rule",
    "conv_sketched_sq_norms",
    "conv_weight_sq_norms",
]


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
        out["weight"] = conv_layer_weight_sq_norms(module, as_float(x), g)
    if want_b:
        out["bias"] = g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2).square().sum(dim=1)
    return out


def conv_layer_weight_sq_norms(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared norms of a convolution's weight gradient, by the cheapest form (module docstring).

    Args:
        module: the ``nn.Conv{1,2,3}d``.
        x: ``(B, C_in, *spatial)`` its input (float32 or wider).
        g: ``(B, C_out, *out_spatial)`` its output gradient.
    """
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    groups = module.groups
    n_pos = math.prod(g.shape[2:])
    k_in = module.in_channels // groups * math.prod(module.kernel_size)
    k_out = module.out_channels // groups
    ghost, material = n_pos * n_pos * (k_in + k_out), n_pos * k_in * k_out
    pads = _pad_amounts(module.padding, module.kernel_size, module.dilation)
    if all(k == 1 for k in module.kernel_size) and all(p == (0, 0) for p in pads):
        # A 1x1 convolution is a Linear over the positions: its inputs as they are, no patches to cut.
        b = x.shape[0]
        xs = x[(slice(None), slice(None), *(slice(None, None, s) for s in module.stride))]  # the positions read
        xv = xs.reshape(b * groups, x.shape[1] // groups, -1).transpose(1, 2)  # (B G, L, C_in / G)
        gv = g.reshape(b * groups, g.shape[1] // groups, -1).transpose(1, 2)  # (B G, L, C_out / G)
        return sequence_linear_sq_norms(xv, gv, with_bias=False)[0].view(b, groups).sum(dim=1)
    sketch = current_sketch()
    if sketch is not None and n_pos * sketch.k * (k_in + k_out) <= PAYS * min(ghost, material):
        return conv_sketched_sq_norms(module, x, g, sketch)
    if material < ghost and x.device.type == "cpu":
        return conv_grouped_weight_sq_norms(module, x, g)
    b = x.shape[0]
    per_example = (k_in * groups) * n_pos
    step = linear_forms.chunk_size(per_example, linear_forms.MAX_BUFFER)
    parts = []
    for i in range(0, b, step):  # the patch matrix in chunks of examples
        patches = conv_patches(
            x[i : i + step],
            kernel_size=module.kernel_size,
            stride=module.stride,
            dilation=module.dilation,
            padding=module.padding,
            padding_mode=module.padding_mode,
        )
        parts.append(conv_weight_sq_norms(patches, g[i : i + step], groups=groups))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def conv_grouped_weight_sq_norms(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared norms of a convolution's weight gradient from the convolution's weight-gradient kernel.

    The batch is folded into the channels, ``(1, B C_in, *spatial)``, and the layer's ``groups`` into ``B * groups``
    groups, so one call of the weight gradient of that grouped convolution returns every example's own weight
    gradient, ``(B C_out, C_in / groups, *kernel)``, without an im2col copy.  Chunks of examples keep that buffer
    within ``linear_forms.CPU_WORKING_SET`` elements (so the allocator keeps its pages between calls; see there),
    and never beyond ``linear_forms.MAX_BUFFER``.
    """
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    nd = len(module.kernel_size)
    pads = _pad_amounts(module.padding, module.kernel_size, module.dilation)
    if module.padding_mode != "zeros" or any(a != b for a, b in pads):
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dimension first
        x = F.pad(x, flat, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        padding = [0] * nd
    else:
        padding = [a for a, _ in pads]
    b, c_in = x.shape[0], x.shape[1]
    c_out, groups = g.shape[1], module.groups
    per_example = c_out * (c_in // groups) * math.prod(module.kernel_size)
    step = linear_forms.chunk_size(per_example, min(linear_forms.MAX_BUFFER, linear_forms.CPU_WORKING_SET))
    parts = []
    for i in range(0, b, step):
        xi, gi = x[i : i + step], g[i : i + step]
        n = xi.shape[0]
        shape = (n * c_out, c_in // groups, *module.kernel_size)
        # Only the weight's shape is read (output_mask asks for the weight gradient alone): an uninitialised
        # stand-in.  Contiguous: a stride-0 view sends the call down a path several times slower.
        weight = gi.new_empty(shape)
        _, per_weight, _ = torch.ops.aten.convolution_backward(
            gi.reshape(1, n * c_out, *gi.shape[2:]),
            xi.reshape(1, n * c_in, *xi.shape[2:]),
            weight,
            None,
            list(module.stride),
            padding,
            list(module.dilation),
            False,
            [0] * nd,
            n * groups,
            [False, True, False],
        )
        parts.append(torch.linalg.vector_norm(per_weight.reshape(n, -1), dim=1).square())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def conv_sketched_sq_norms(module: nn.Module, x: torch.Tensor, g: torch.Tensor, sketch: Sketch) -> torch.Tensor:
    """An unbiased estimate of each example's squared weight-gradient norm from ``k`` random kernels.

    Convolving the input with ``k`` random kernels per group (the layer's own stride, padding and dilation) gives
    the patches times a random ``(C_in K / groups, k)`` projection ``R_j``; then ``|G_{i,j}^T U_{i,j} R_j|^2 / k``
    estimates ``|W_{i,j}|^2`` without bias (``rules.sketch``).  ``B L k (C_in K + C_out)`` multiply-adds.
    """
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    k, groups = sketch.k, module.groups
    kernels = sketch.kernels((k * groups, module.in_channels // groups, *module.kernel_size), x.device, x.dtype)
    projected = module._conv_forward(x, kernels, None)  # (B, k G, *out): group j's patches times R_j
    b = x.shape[0]
    xr = projected.reshape(b * groups, k, -1)  # (B G, k, L)
    gg = g.reshape(b * groups, g.shape[1] // groups, -1)  # (B G, C_out / G, L)
    if xr.shape[2] != gg.shape[2]:
        raise ValueError(f"{xr.shape[2]} projected positions but {gg.shape[2]} output positions")
    step = linear_forms.chunk_size(groups * gg.shape[1] * k, linear_forms.MAX_BUFFER)
    parts = [
        torch.linalg.vector_norm(
            torch.bmm(
                gg[i * groups : (i + step) * groups], xr[i * groups : (i + step) * groups].transpose(1, 2)
            ).reshape(-1, groups * gg.shape[1] * k),
            dim=1,
        )
        for i in range(0, b, step)
    ]
    norms = parts[0] if len(parts) == 1 else torch.cat(parts)
    return norms.square_().div_(k)
