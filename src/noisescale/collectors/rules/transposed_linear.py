"""Per-example squared gradient norms of a linear layer that stores its weight transposed.

Hugging Face's ``Conv1D`` (GPT-2, its projections and MLP) computes ``y = x W + b`` with ``W`` of shape
``(d_in, d_out)``: a ``Linear`` whose weight is ``W^T``.  Its per-example weight gradient ``sum_t x_t g_t^T`` is
the transpose of the ``Linear`` one, with the same Frobenius norm, so the ``Linear`` maths apply as they are
(``affine_map_sq_norms``).  The library cannot be imported here, so the layer is recognised by structure: a class
named ``Conv1D`` with a 2-D ``weight``, a matching ``bias`` and an ``nf`` attribute, and checked on its first
forward pass against ``x W + b``.
"""

from __future__ import annotations

import torch
from torch import nn

from noisescale.collectors.rules.common import rounding_tolerance
from noisescale.collectors.rules.linear import affine_map_sq_norms
from noisescale.collectors.rules.registry import Recognized, recognize_layers
from noisescale.errors import UnsupportedLayerError

__all__ = ["transposed_linear_rule"]


def transposed_linear_rule(
    module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example squared norms of ``weight`` ``(d_in, d_out)`` and ``bias`` of ``y = x W + b``."""
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    weight, bias = module.weight, module.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    return affine_map_sq_norms(x, grad_output, weight=weight.requires_grad, bias=bias.requires_grad)


def _looks_like_transposed_linear(module: nn.Module) -> bool:
    if type(module).__name__ != "Conv1D" or next(module.children(), None) is not None:
        return False
    own = dict(module.named_parameters(recurse=False))
    if set(own) != {"weight", "bias"}:
        return False
    weight, bias = own["weight"], own["bias"]
    return weight.dim() == 2 and bias.shape == (weight.shape[1],) and getattr(module, "nf", None) == weight.shape[1]


def _check_transposed_linear_output(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
    """Refuse a recognised ``Conv1D`` whose output is not ``x W + b``."""
    x = inputs[0] if inputs else None
    weight, bias = module.weight, module.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    worst = float("nan")
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.shape[:-1] == output.shape[:-1]:
        with torch.no_grad():
            wide = torch.float64 if x.dtype == torch.float64 else torch.float32
            expected = x.to(wide) @ weight.to(wide) + bias.to(wide)
            out = output.to(wide)
            # The product's rounding, relative to the size of its terms.
            scale = float((x.to(wide).abs() @ weight.to(wide).abs()).max()) + float(bias.abs().max())
            tol = rounding_tolerance(output.dtype, scale)
            worst = float((out - expected).abs().max())
            if worst <= tol:
                return
    raise UnsupportedLayerError(
        f"{type(module).__name__} looks like a linear layer with a transposed weight (Hugging Face's Conv1D), but "
        f"its output is not x @ weight + bias (largest difference {worst:.3g}); register a rule of its own with "
        f"@noisescale.register_norm_rule({type(module).__name__})"
    )


recognize_layers(
    Recognized(
        matches=_looks_like_transposed_linear, rule=transposed_linear_rule, check=_check_transposed_linear_output
    )
)
