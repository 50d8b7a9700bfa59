"""Per-example squared gradient norms of normalisation layers: ``nn.LayerNorm`` and ``nn.RMSNorm``.

Both compute ``y = x_hat * w (+ b)`` over the trailing ``normalized_shape`` dimensions of ``x`` with a
parameter-free ``x_hat``, so for one example with positions ``t`` (every dimension between the batch and the
normalised ones) and output gradients ``g_t``:

    grad_w = sum_t g_t * x_hat_t   (elementwise),     grad_b = sum_t g_t.

``x_hat`` is recomputed from the layer's input at ``O(B T N)``:

* LayerNorm: ``x_hat = (x - mean(x)) / sqrt(var(x) + eps)`` (biased variance over the normalised dimensions);
* RMSNorm: ``x_hat = x / sqrt(mean(x^2) + eps)``; ``eps=None`` is the machine epsilon of the computation type
  (float64 for float64 inputs, float32 otherwise), as in ``torch.nn.functional.rms_norm``.

Other hand-written norms (nanoGPT's ``LayerNorm``, which calls ``F.layer_norm`` with a fixed epsilon and an
optional bias; T5's ``T5LayerNorm``, an RMSNorm by another name) are recognised as a childless module named
``*Norm*`` with a ``weight`` and at most a matching ``bias``: their first call tells which maths they compute
(LayerNorm, RMSNorm, or RMSNorm with ``1 + weight``) and with which epsilon, and anything else is refused.

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
from collections.abc import Callable

import torch
from torch import nn

from noisescale.collectors.rules.common import affine_rule, as_float, first_tensor, output_size, rounding_tolerance
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
    x = first_tensor(inputs)
    w = None if module.weight is None else module.weight.double()
    b = None if module.bias is None else module.bias.double()
    return output_size(torch.nn.functional.layer_norm(x.double(), module.normalized_shape, w, b, module.eps))


def rms_norm_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.RMSNorm.forward`` outputs for ``inputs``, in float64, and its size."""
    assert isinstance(module, nn.RMSNorm)
    x = first_tensor(inputs)
    w = None if module.weight is None else module.weight.double()
    eps = (
        module.eps
        if module.eps is not None
        else torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    )
    return output_size(torch.nn.functional.rms_norm(x.double(), module.normalized_shape, w, eps))


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


# -- hand-written norms of other names (nanoGPT's LayerNorm, T5's T5LayerNorm, ...) -------------------------------

_EPS_CANDIDATES = (1e-5, 1e-6, 1e-12, 1e-8)


def _looks_like_hand_written_norm(module: nn.Module) -> bool:
    """A childless module named ``*Norm*`` holding a ``weight`` and at most a matching ``bias``.

    Not torch's own layers (``BatchNorm``'s statistics couple the examples; the others have rules), nor a batch
    norm of another library.
    """
    cls = type(module)
    if "Norm" not in cls.__name__ or "Batch" in cls.__name__ or cls.__module__.startswith("torch."):
        return False
    if next(module.children(), None) is not None:
        return False
    own = dict(module.named_parameters(recurse=False))
    weight = own.get("weight")
    if weight is None or not set(own) <= {"weight", "bias"}:
        return False
    return "bias" not in own or own["bias"].shape == weight.shape


def _hand_written_norm_rule(
    module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
) -> dict[str, torch.Tensor]:
    raise RuntimeError("a hand-written norm is measured by the rule its first call identified")  # pragma: no cover


def _identify_hand_written_norm(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor):  # type: ignore[no-untyped-def]
    """Tell which maths a hand-written norm computes, and return the rule for it.

    The layer is run once more on its first input with its parameters perturbed (``torch.func.functional_call``:
    the module itself is not touched), so a ``bias`` still at zero, or a weight at one, cannot hide how they are
    used.  Tried, for the layer's own epsilon (``eps``, ``variance_epsilon``, ``epsilon``) or else the usual
    ones: ``layer_norm(x) * w (+ b)``, ``x / sqrt(mean(x^2) + eps) * w (+ b)`` and the same with ``1 + w`` (RMSNorm
    forms; T5's ``T5LayerNorm`` is one).  A layer that computes none of them is refused.
    """
    x = inputs[0] if inputs else None
    weight = module.weight
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    assert isinstance(weight, torch.Tensor)
    own_eps = next(
        (
            float(v)
            for n in ("eps", "variance_epsilon", "epsilon")
            if isinstance(v := getattr(module, n, None), (int, float)) and not isinstance(v, bool)
        ),
        None,
    )
    candidates = (own_eps,) if own_eps is not None else _EPS_CANDIDATES
    worst = float("nan")
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.shape == output.shape:
        nd = weight.dim()
        with torch.no_grad():
            gen = torch.Generator(device=weight.device).manual_seed(0)
            w = weight + 0.5 * torch.rand(weight.shape, generator=gen, device=weight.device, dtype=weight.dtype)
            probe = {"weight": w}
            b = None
            if bias is not None:
                b = bias + 0.5 * torch.rand(bias.shape, generator=gen, device=bias.device, dtype=bias.dtype)
                probe["bias"] = b
            out = torch.func.functional_call(module, probe, (x,))
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                out = None
        if out is not None:
            with torch.no_grad():
                wide = torch.float64 if x.dtype == torch.float64 else torch.float32
                xf, outf, wf = x.to(wide), out.to(wide), w.to(wide)
                bf = None if b is None else b.to(wide)
                tol = rounding_tolerance(out.dtype, float(outf.abs().max()) if outf.numel() else 0.0)
                dims = tuple(range(x.dim() - nd, x.dim()))
                for eps in candidates:
                    x_hat = xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
                    forms = {
                        "layer": torch.nn.functional.layer_norm(xf, tuple(weight.shape), wf, bf, eps),
                        "rms": x_hat * wf if bf is None else x_hat * wf + bf,
                        "rms1": x_hat * (1.0 + wf) if bf is None else x_hat * (1.0 + wf) + bf,
                    }
                    for kind, expected in forms.items():
                        err = float((outf - expected).abs().max())
                        worst = err if math.isnan(worst) else min(worst, err)
                        if err <= tol:
                            return _identified_rule(kind, nd, eps)
    held = "a weight and a bias" if bias is not None else "a weight"
    raise UnsupportedLayerError(
        f"{type(module).__name__} looks like a normalisation layer ({held}), "
        f"but its output is neither a LayerNorm nor an RMSNorm of its input, with every parameter used (smallest "
        f"largest difference {worst:.3g}); register a rule of its own with "
        f"@noisescale.register_norm_rule({type(module).__name__})"
    )


def _identified_rule(kind: str, normalized_ndim: int, eps: float) -> Callable[..., dict[str, torch.Tensor]]:
    if kind == "layer":

        def layer_rule(
            module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
        ) -> dict[str, torch.Tensor]:
            return affine_rule(
                module,
                inputs,
                lambda x: layer_norm_sq_norms(x, grad_output, normalized_ndim=normalized_ndim, eps=eps),
            )

        return layer_rule

    def rms_rule(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
        x = inputs[0]
        assert isinstance(x, torch.Tensor)
        out: dict[str, torch.Tensor] = {}
        weight, bias = module.weight, getattr(module, "bias", None)
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            out["weight"] = rms_norm_sq_norms(x, grad_output, normalized_ndim=normalized_ndim, eps=eps)
        if isinstance(bias, torch.Tensor) and bias.requires_grad:
            g = _positions(as_float(grad_output), normalized_ndim)
            out["bias"] = g.sum(dim=1).square().sum(dim=1)
        return out

    return rms_rule


recognize_layers(
    Recognized(
        matches=_looks_like_hand_written_norm,
        rule=_hand_written_norm_rule,
        check=_identify_hand_written_norm,
        normalization=True,
    )
)
