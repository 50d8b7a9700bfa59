"""Per-example squared gradient norms of ``nn.GroupNorm``.

GroupNorm normalises each example on its own (over the channels of a group and all spatial positions), so
per-example gradients are well defined, unlike BatchNorm's.  With ``x_hat`` the normalised input and ``g`` the
output gradient, both ``(B, C, *spatial)``, the affine parameters (one entry per channel ``c``) get

    grad_w[c] = sum_s g[c, s] * x_hat[c, s],     grad_b[c] = sum_s g[c, s]

per example, where ``x_hat = (x - mean) / sqrt(var + eps)`` over each group's ``(C / G, *spatial)`` entries
(biased variance).  Cost ``O(B C S)``, no per-example weight gradient beyond ``(B, C)``.
"""

from __future__ import annotations

import torch
from torch import nn

from noisescale.collectors.rules.common import affine_rule, as_float, first_tensor, output_size
from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.errors import UnsupportedLayerError

__all__ = ["group_norm_reference", "group_norm_rule", "group_norm_sq_norms"]


def group_norm_sq_norms(
    x: torch.Tensor, grad_output: torch.Tensor, *, num_groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(|grad_w|^2, |grad_b|^2)`` of a GroupNorm; ``x`` and ``grad_output`` are ``(B, C, *spatial)``."""
    if x.dim() < 2:
        raise UnsupportedLayerError(
            f"nn.GroupNorm got an input of shape {tuple(x.shape)}: per-example norms need (B, C, *spatial)"
        )
    b, c = x.shape[:2]
    xg = as_float(x).reshape(b, num_groups, -1)  # (B, G, C/G * S)
    mean = xg.mean(dim=-1, keepdim=True)
    var = xg.var(dim=-1, unbiased=False, keepdim=True)
    x_hat = ((xg - mean) * torch.rsqrt(var + eps)).reshape(b, c, -1)  # (B, C, S)
    g = as_float(grad_output).reshape(b, c, -1)
    grad_w = (g * x_hat).sum(dim=-1)  # (B, C)
    grad_b = g.sum(dim=-1)
    return grad_w.square().sum(dim=1), grad_b.square().sum(dim=1)


def group_norm_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.GroupNorm.forward`` outputs for ``inputs``, in float64, and its size."""
    assert isinstance(module, nn.GroupNorm)
    x = first_tensor(inputs)
    w = None if module.weight is None else module.weight.double()
    b = None if module.bias is None else module.bias.double()
    return output_size(torch.nn.functional.group_norm(x.double(), module.num_groups, w, b, module.eps))


@register_norm_rule(nn.GroupNorm, normalization=True, reference=group_norm_reference)
def group_norm_rule(
    module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example squared norms of ``weight`` and ``bias`` of an ``nn.GroupNorm`` (see the module docstring)."""
    assert isinstance(module, nn.GroupNorm)
    return affine_rule(
        module,
        inputs,
        lambda x: group_norm_sq_norms(x, grad_output, num_groups=module.num_groups, eps=module.eps),
    )
