"""Per-example gradient Gram matrices of a layer: ``K_ij = <grad_i, grad_j>`` over its parameters, ``(B, B)``.

The norm rules give each example's squared gradient norm ``K_ii`` only.  Statistics of groups of examples (data
sources: ``monitor.step(groups=ids)``) need the cross terms too, because the gradient of a group is the sum of its
examples' gradients: ``|sum_{i in s} g_i|^2 = 1_s^T K 1_s`` and ``<sum_{i in s} g_i, sum_j g_j> = 1_s^T K 1``.
The groups are only known when ``monitor.step()`` is called, after backward, so the hooks keep the whole ``K`` of
each backward pass (``B x B`` numbers, whatever the number of groups) and the groups are applied to it then.

A *Gram rule* mirrors a norm rule: ``(module, inputs, grad_output) -> {param_name: (B, B)}``, with the same
arguments and the same units (each example's share of ``p.grad``), and its diagonal is what the norm rule returns
(a test holds every built-in pair to each other).  Built-in forms, each the cheapest exact one for the shapes:

* ``nn.Linear`` (and Hugging Face's transposed ``Conv1D``), 2-D input ``(B, d_in)``: the weight gradient of
  example ``i`` is ``g_i x_i^T``, so ``K = (G G^T) * (X X^T)`` (elementwise), ``O(B^2 (d_in + d_out))``; the bias's
  is ``G G^T``.
* the same with positions, ``(B, T, d_in)``: either materialise each example's weight gradient ``G_i^T X_i`` and
  take their Gram, ``O(B d_in d_out (T + B))``, or the token Gram matrices ``(B T)^2 (d_in + d_out)`` summed over
  each pair of examples' blocks; the cheaper by that count.
* ``nn.Embedding``: each example's gradient gathered into the rows of the ids it read (a dense ``(B, V, D)``
  buffer for a vocabulary up to ``8 T``, else over the batch's distinct ids, found with ``torch.unique``, which
  synchronises with an accelerator), then their Gram matrix.
* ``nn.LayerNorm`` and ``nn.RMSNorm`` (and the Hugging Face RMSNorms the norm rule recognises): each example's
  gradient is a vector, ``sum_t g_t * x_hat_t`` (and ``sum_t g_t``): its Gram matrix, ``O(B^2 N)``.

``register_gram_rule(norm_rule)`` adds the form of a layer measured by another norm rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from noisescale.collectors.rules.common import as_float, flatten_sequence
from noisescale.collectors.rules.embedding import embedding_rule
from noisescale.collectors.rules.linear import linear_rule
from noisescale.collectors.rules.norm import layer_norm_rule, rms_norm_rule
from noisescale.collectors.rules.registry import NormRule
from noisescale.collectors.rules.transposed_linear import transposed_linear_rule

__all__ = [
    "GramRule",
    "affine_map_gram",
    "embedding_gram",
    "find_gram_rule",
    "register_gram_rule",
    "vector_gram",
]

GramRule = Callable[[nn.Module, tuple[object, ...], torch.Tensor], Mapping[str, torch.Tensor]]
"""``(module, inputs, grad_output) -> {param_name: (B, B) per-example gradient Gram matrix}``."""

_GRAM_RULES: dict[NormRule, GramRule] = {}

G = TypeVar("G", bound=GramRule)


def register_gram_rule(norm_rule: NormRule) -> Callable[[G], G]:
    """Register the Gram form of the layers measured by ``norm_rule`` (per-source statistics need one per layer).

    Args:
        norm_rule: the norm rule the layers are measured with (``register_norm_rule``'s function).

    Returns:
        A decorator that registers the Gram rule and returns it unchanged.
    """
    if not callable(norm_rule):
        raise TypeError(f"register_gram_rule expects the layer's norm rule (a function), got {norm_rule!r}")

    def decorator(rule: G) -> G:
        _GRAM_RULES[norm_rule] = rule
        return rule

    return decorator


def find_gram_rule(norm_rule: NormRule) -> GramRule | None:
    """The Gram form registered for the layers measured by ``norm_rule``, or ``None``."""
    return _GRAM_RULES.get(norm_rule)


def vector_gram(v: torch.Tensor) -> torch.Tensor:
    """``v v^T`` for per-example gradient vectors ``v`` of shape ``(B, n)``, in at least float32: ``(B, B)``."""
    v = as_float(v)
    return v @ v.T


def _block_sum(k: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Sum a ``(B T, B T)`` token matrix over each pair of examples' ``T x T`` blocks: ``(B, B)``."""
    return k.view(b, t, b, t).sum(dim=(1, 3))


def affine_map_gram(x: torch.Tensor, g: torch.Tensor, *, weight: bool, bias: bool) -> dict[str, torch.Tensor]:
    """Per-example gradient Gram matrices of ``y = x W^T + b`` (or ``x W + b``; a transpose changes no inner product).

    Args:
        x: ``(B, *positions, d_in)`` input.
        g: ``(B, *positions, d_out)`` output gradient.
        weight: whether the weight needs a gradient.
        bias: whether there is a bias that needs one.

    Returns:
        ``{"weight": (B, B), "bias": (B, B)}``, each present only if asked for.
    """
    out: dict[str, torch.Tensor] = {}
    x, g = as_float(x), as_float(g)
    if x.dim() == 2:
        gram_g = g @ g.T  # (B, B)
        if weight:
            out["weight"] = gram_g * (x @ x.T)
        if bias:
            out["bias"] = gram_g
        return out
    x3, g3 = flatten_sequence(x), flatten_sequence(g)  # (B, T, d_in), (B, T, d_out)
    b, t, m = x3.shape
    n = g3.shape[-1]
    if weight:
        if t * t * (m + n) * b < m * n * (t + b):  # (B T)^2 (m + n) against B m n (T + B) multiply-adds
            # Token Gram matrices, summed over each pair of examples' blocks.
            xf, gf = x3.reshape(b * t, m), g3.reshape(b * t, n)
            out["weight"] = _block_sum((gf @ gf.T).mul_(xf @ xf.T), b, t)
        else:
            per_example = torch.bmm(g3.transpose(1, 2), x3).reshape(b, n * m)  # (B, d_out * d_in)
            out["weight"] = per_example @ per_example.T
    if bias:
        out["bias"] = vector_gram(g3.sum(dim=1))
    return out


@register_gram_rule(linear_rule)
def linear_gram(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gram matrices of ``weight`` and ``bias`` of an ``nn.Linear`` (see the module docstring)."""
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    return affine_map_gram(
        x,
        grad_output,
        weight=weight.requires_grad,
        bias=isinstance(bias, torch.Tensor) and bias.requires_grad,
    )


register_gram_rule(transposed_linear_rule)(linear_gram)


_DENSE_VOCAB_PER_POSITION = 8  # a dense (B, V, D) buffer only up to 8 times the output gradient's size


def embedding_gram(
    idx: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    padding_idx: int | None = None,
    num_embeddings: int | None = None,
) -> torch.Tensor:
    """``K_ij = sum_{t,s} [idx_it == idx_js] (g_it . g_js)``, the Gram matrix of an embedding's weight gradients.

    Args:
        idx: ``(B, *positions)`` token ids.
        grad_output: ``(B, *positions, D)`` output gradient.
        padding_idx: the id whose positions get no gradient, or ``None``.
        num_embeddings: the vocabulary size, for the dense form; ``None`` uses the distinct ids.

    Returns:
        ``(B, B)`` in at least float32.
    """
    b = idx.shape[0]
    ids = idx.reshape(b, -1)  # (B, T)
    t = ids.shape[1]
    g = as_float(grad_output).reshape(b, t, -1)  # (B, T, D)
    d = g.shape[2]
    if padding_idx is not None:
        g = g.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
    if num_embeddings is not None and num_embeddings <= _DENSE_VOCAB_PER_POSITION * t:
        vocab, rows = num_embeddings, ids
    else:
        # Only the ids this batch read: a (B, U, D) buffer, U <= B T.  torch.unique waits for an accelerator.
        uniq, inverse = torch.unique(ids, return_inverse=True)
        vocab, rows = int(uniq.numel()), inverse.reshape(b, t)
    # Row b * V + id of a (B * V, D) buffer collects example b's gradient rows of that id.
    flat = rows + torch.arange(b, device=ids.device).unsqueeze(1) * vocab
    dense = g.new_zeros(b * vocab, d).index_add_(0, flat.reshape(-1), g.reshape(b * t, d))
    return vector_gram(dense.view(b, vocab * d))


@register_gram_rule(embedding_rule)
def embedding_gram_rule(
    module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gram matrix of ``weight`` of an ``nn.Embedding`` (see ``embedding_gram``)."""
    assert isinstance(module, nn.Embedding)
    if not module.weight.requires_grad:
        return {}
    idx = inputs[0]
    assert isinstance(idx, torch.Tensor)
    return {
        "weight": embedding_gram(idx, grad_output, padding_idx=module.padding_idx, num_embeddings=module.num_embeddings)
    }


def _positions(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """View ``(B, *positions, *normalized)`` as ``(B, T, N)`` (the norm rules' view)."""
    return x.reshape(x.shape[0], -1, math.prod(x.shape[x.dim() - ndim :]))


def _normalized(x: torch.Tensor, ndim: int, kind: str, eps: float | None) -> torch.Tensor:
    """``x_hat`` of a LayerNorm (``kind="layer"``) or an RMSNorm over the last ``ndim`` dimensions, as ``(B, T, N)``."""
    x3 = _positions(as_float(x), ndim)
    if kind == "layer":
        assert eps is not None
        return torch.nn.functional.layer_norm(x3, (x3.shape[-1],), eps=eps)
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return x3 * torch.rsqrt(x3.square().mean(dim=-1, keepdim=True) + eps)


@register_gram_rule(layer_norm_rule)
def layer_norm_gram(
    module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gram matrices of ``weight`` (``sum_t g_t * x_hat_t`` per example) and ``bias`` (``sum_t g_t``) of a LayerNorm."""
    assert isinstance(module, nn.LayerNorm)
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    ndim = len(module.normalized_shape)
    g3 = _positions(as_float(grad_output), ndim)  # (B, T, N)
    out: dict[str, torch.Tensor] = {}
    if module.weight is not None and module.weight.requires_grad:
        out["weight"] = vector_gram((g3 * _normalized(x, ndim, "layer", module.eps)).sum(dim=1))
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = vector_gram(g3.sum(dim=1))
    return out


@register_gram_rule(rms_norm_rule)
def rms_norm_gram(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gram matrix of ``weight`` of an RMSNorm (``sum_t g_t * x_hat_t`` per example), as ``rms_norm_rule`` reads it."""
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.requires_grad):
        return {}
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    shape = getattr(module, "normalized_shape", None)
    ndim = len(shape) if shape is not None else weight.dim()
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    g3 = _positions(as_float(grad_output), ndim)
    x_hat = _normalized(x, ndim, "rms", None if eps is None else float(eps))
    return {"weight": vector_gram((g3 * x_hat).sum(dim=1))}
