"""Per-example squared gradient norms of normalisation layers: ``nn.LayerNorm`` and ``nn.RMSNorm``.

Both compute ``y = x_hat * w (+ b)`` over the trailing ``normalized_shape`` dimensions of ``x`` with a
parameter-free ``x_hat``, so for one example with positions ``t`` (every dimension between the batch and the
normalised ones) and output gradients ``g_t``:

    grad_w = sum_t g_t * x_hat_t   (elementwise),     grad_b = sum_t g_t.

``x_hat`` is recomputed from the layer's input at ``O(B T N)``:

* LayerNorm: ``x_hat = (x - mean(x)) / sqrt(var(x) + eps)`` (biased variance over the normalised dimensions);
* RMSNorm: ``x_hat = x / sqrt(mean(x^2) + eps)``; ``eps=None`` is the machine epsilon of the computation type
  (float64 for float64 inputs, float32 otherwise), as in ``torch.nn.functional.rms_norm``.

These layers are registered with ``normalization=True``: ``scope="norm"`` measures only them (Gray et al.
2024).  Hand-written RMSNorms, as every Hugging Face decoder has (``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``MistralRMSNorm``, ``GemmaRMSNorm``, ...), are recognised: a class whose name ends in ``RMSNorm``, with one
parameter, ``weight``, no submodules and an ``eps`` or ``variance_epsilon`` attribute.  On its first forward
pass the layer's output is compared with ``x_hat * weight`` and ``x_hat * (1 + weight)`` (Gemma; the same
weight gradient); one that computes anything else is refused with an error.  Another hand-written RMSNorm
(``eps`` inside the square root) is registered with one line::

    noisescale.register_norm_rule(MyRMSNorm, normalization=True)(rms_norm_rule)
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from noisescale.collectors.rules.common import affine_rule, as_float, rounding_tolerance
from noisescale.collectors.rules.registry import Recognized, recognize_layers, register_norm_rule
from noisescale.errors import UnsupportedLayerError

__all__ = [
    "layer_norm_reference",
    "layer_norm_rule",
    "layer_norm_sq_norms",
    "rms_norm_reference",
    "rms_norm_rule",
    "rms_norm_sq_norms",
]


def _positions(x: torch.Tensor, normalized_ndim: int) -> torch.Tensor:
    """View ``(B, *positions, *normalized)`` as ``(B, T, N)``."""
    if x.dim() <= normalized_ndim:
        raise UnsupportedLayerError(
            f"a normalisation layer over {normalized_ndim} dimension(s) got an input of shape {tuple(x.shape)}: "
            "per-example norms need a leading batch dimension"
        )
    n = math.prod(x.shape[x.dim() - normalized_ndim :])
    return x.reshape(x.shape[0], -1, n)


@functools.lru_cache(maxsize=32)
def _ones_cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)


def _ones(n: int, like: torch.Tensor) -> torch.Tensor:
    """A cached ``(n,)`` tensor of ones with ``like``'s dtype and device (no allocation per call)."""
    return _ones_cached(n, like.dtype, like.device)


def layer_norm_sq_norms(
    x: torch.Tensor, grad_output: torch.Tensor, *, normalized_ndim: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(|sum_t g_t * x_hat_t|^2, |sum_t g_t|^2)`` of a LayerNorm's weight and bias.

    Args:
        x: ``(B, *positions, *normalized_shape)`` input of the layer.
        grad_output: gradient of the loss with respect to the layer's output, same shape as ``x``.
        normalized_ndim: ``len(normalized_shape)``.
        eps: the layer's ``eps``.

    Returns:
        Two ``(B,)`` tensors: squared norms of the weight and of the bias gradients.
    """
    x3, g3 = _positions(as_float(x), normalized_ndim), _positions(as_float(grad_output), normalized_ndim)  # (B, T, N)
    # x_hat by torch's fused kernel, in one pass instead of five.  With a weight of ones: on CPU the kernel
    # without a weight takes a slower path (2x at (32, 64, 128)), and x_hat * 1 is exact.
    x_hat = torch.nn.functional.layer_norm(x3, (x3.shape[-1],), _ones(x3.shape[-1], x3), eps=eps)
    # In place on the fresh x_hat: a (B, T, N) temporary less, whose pages a CPU allocator would fault in anew.
    return x_hat.mul_(g3).sum(dim=1).square_().sum(dim=1), g3.sum(dim=1).square_().sum(dim=1)


def rms_norm_sq_norms(
    x: torch.Tensor, grad_output: torch.Tensor, *, normalized_ndim: int, eps: float | None = None
) -> torch.Tensor:
    """Per-example ``|sum_t g_t * x_hat_t|^2`` of an RMSNorm's weight, ``x_hat = x / sqrt(mean(x^2) + eps)``.

    Args:
        x: ``(B, *positions, *normalized_shape)`` input of the layer.
        grad_output: gradient of the loss with respect to the layer's output, same shape as ``x``.
        normalized_ndim: number of trailing dimensions normalised over.
        eps: the layer's epsilon; ``None`` is ``torch.finfo(float64).eps`` for a float64 ``x`` and
            ``torch.finfo(float32).eps`` otherwise (``torch.nn.functional.rms_norm``'s default).

    Returns:
        ``(B,)`` squared norms of the weight gradients.
    """
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    x3, g3 = _positions(as_float(x), normalized_ndim), _positions(as_float(grad_output), normalized_ndim)  # (B, T, N)
    x_hat = x3 * torch.rsqrt(x3.square().mean(dim=-1, keepdim=True).add_(eps))
    return x_hat.mul_(g3).sum(dim=1).square_().sum(dim=1)


def layer_norm_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.LayerNorm.forward`` outputs for ``inputs``, in float64, and its size."""
    assert isinstance(module, nn.LayerNorm)
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor):
        raise TypeError("the first input is not a tensor")
    w = None if module.weight is None else module.weight.double()
    b = None if module.bias is None else module.bias.double()
    out = torch.nn.functional.layer_norm(x.double(), module.normalized_shape, w, b, module.eps)
    return out, float(out.abs().max()) if out.numel() else 0.0


def rms_norm_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.RMSNorm.forward`` outputs for ``inputs``, in float64, and its size."""
    assert isinstance(module, nn.RMSNorm)
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor):
        raise TypeError("the first input is not a tensor")
    w = None if module.weight is None else module.weight.double()
    eps = (
        module.eps
        if module.eps is not None
        else torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    )
    out = torch.nn.functional.rms_norm(x.double(), module.normalized_shape, w, eps)
    return out, float(out.abs().max()) if out.numel() else 0.0


@register_norm_rule(nn.LayerNorm, normalization=True, reference=layer_norm_reference)
def layer_norm_rule(
    module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example squared norms of ``weight`` and ``bias`` of an ``nn.LayerNorm`` (see the module docstring)."""
    assert isinstance(module, nn.LayerNorm)
    ndim = len(module.normalized_shape)
    return affine_rule(
        module, inputs, lambda x: layer_norm_sq_norms(x, grad_output, normalized_ndim=ndim, eps=module.eps)
    )


@register_norm_rule(nn.RMSNorm, normalization=True, reference=rms_norm_reference)
def rms_norm_rule(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example squared norm of ``weight`` of ``nn.RMSNorm`` or of a hand-written RMSNorm.

    The module needs a ``weight`` whose shape is the normalised shape (or a ``normalized_shape`` attribute) and
    its epsilon as ``eps`` (``None`` allowed, see ``rms_norm_sq_norms``) or ``variance_epsilon`` (Hugging Face
    naming); ``x_hat = x / sqrt(mean(x^2) + eps)``.

    Raises:
        UnsupportedLayerError: if the module has no ``eps`` / ``variance_epsilon`` attribute.
    """
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.requires_grad):
        return {}
    if hasattr(module, "eps"):
        eps = module.eps
    elif hasattr(module, "variance_epsilon"):
        eps = module.variance_epsilon
    else:
        raise UnsupportedLayerError(
            f"rms_norm_rule needs the epsilon of {type(module).__name__} as an `eps` or `variance_epsilon` "
            "attribute; add one, or register a rule of your own for this layer"
        )
    shape = getattr(module, "normalized_shape", None)
    normalized_ndim = len(shape) if shape is not None else weight.dim()
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    eps_value = None if eps is None else float(eps)  # type: ignore[arg-type]
    return {"weight": rms_norm_sq_norms(x, grad_output, normalized_ndim=normalized_ndim, eps=eps_value)}


_NO_EPS = object()


def _epsilon(module: nn.Module) -> object:
    return getattr(module, "eps", getattr(module, "variance_epsilon", _NO_EPS))


def _looks_like_rms_norm(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("RMSNorm") or next(module.children(), None) is not None:
        return False
    own = dict(module.named_parameters(recurse=False))
    eps = _epsilon(module)
    return set(own) == {"weight"} and (eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool)))


def _check_rms_norm_output(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
    """Refuse a recognised RMSNorm whose output is neither ``x_hat * w`` nor ``x_hat * (1 + w)``."""
    x = inputs[0] if inputs else None
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    ok, worst = False, float("nan")
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.shape == output.shape:
        with torch.no_grad():
            wide = torch.float64 if x.dtype == torch.float64 else torch.float32
            eps = _epsilon(module)
            eps_value = torch.finfo(wide).eps if eps is None else float(eps)  # type: ignore[arg-type]
            xf = x.to(wide)
            dims = tuple(range(x.dim() - weight.dim(), x.dim()))
            x_hat = xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps_value)
            out, w = output.to(wide), weight.to(wide)
            tol = rounding_tolerance(output.dtype, float(out.abs().max()))
            errors = [float((out - x_hat * form).abs().max()) for form in (w, 1.0 + w)]
            worst = min(errors)
            ok = worst <= tol
    if not ok:
        raise UnsupportedLayerError(
            f"{type(module).__name__} looks like an RMSNorm (one `weight`, an epsilon), but its output is neither "
            f"x / sqrt(mean(x^2) + eps) * weight nor the same times (1 + weight) (largest difference {worst:.3g}); "
            f"register a rule of its own with @noisescale.register_norm_rule({type(module).__name__})"
        )


recognize_layers(
    Recognized(matches=_looks_like_rms_norm, rule=rms_norm_rule, check=_check_rms_norm_output, normalization=True)
)
