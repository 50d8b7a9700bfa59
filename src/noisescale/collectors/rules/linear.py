"""Per-example squared gradient norms of ``nn.Linear``.

For one example with inputs ``x_t`` (``t`` over the sequence positions, ``T = 1`` for a 2-D input) and output
gradients ``g_t``, the weight gradient is ``W_i = sum_t g_t x_t^T`` and the bias gradient ``sum_t g_t``.

* 2-D input ``(B, d_in)``: ``|W_i|^2 = |g_i|^2 |x_i|^2`` exactly, at ``O(B (d_in + d_out))``.
* 3-D input ``(B, T, d_in)``: either the "ghost" form (Goodfellow 2015; Li et al. 2022)
  ``|W_i|^2 = sum_{t,s} (x_t . x_s)(g_t . g_s)``, at ``O(B T^2 (d_in + d_out))`` and ``(B, T, T)`` memory, or
  the materialised ``W_i = G_i^T X_i`` at ``O(B T d_in d_out)`` and ``(B, d_out, d_in)`` memory; the cheaper
  one is chosen per call from the shapes.

Layers that read the same input (separate query, key and value projections; gate and up projections) share its
Gram matrix ``X_i X_i^T`` in the ghost form: the last one computed is kept in the collector's ``GramCache``
(made current around its hooks with ``use_gram_cache``), keyed by the input tensor itself (object and version),
until that tensor is freed or another input's Gram replaces it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from noisescale.collectors.rules.common import as_float, bmm_float, first_tensor, flatten_sequence
from noisescale.collectors.rules.registry import register_norm_rule

__all__ = [
    "GramCache",
    "affine_map_sq_norms",
    "linear_reference",
    "linear_rule",
    "sequence_linear_sq_norms",
    "sq_norm_of_sum_over_positions",
    "use_gram_cache",
]


class GramCache:
    """The input Gram matrix of the last ghost-form call, for the next layer that reads the same input tensor.

    In a backward pass the layers that read one input run one after the other, so one entry is enough.  The key
    is a weak reference to the input and its version counter: a different or modified tensor never matches,
    and the entry is dropped as soon as the input is freed.  The entry is one tuple, read and replaced whole,
    so backward passes on several threads (one per device) can only evict each other's entries, never mix them.
    """

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref[torch.Tensor], int, torch.Tensor] | None = None
        self.hits = 0  # for tests and diagnostics

    def get(self, source: torch.Tensor) -> torch.Tensor | None:
        entry = self._entry
        if entry is not None and entry[0]() is source and entry[1] == source._version:
            self.hits += 1
            return entry[2]
        return None

    def put(self, source: torch.Tensor, gram: torch.Tensor) -> None:
        self._entry = (weakref.ref(source, self._forget), source._version, gram)

    def _forget(self, ref: weakref.ref[torch.Tensor]) -> None:
        entry = self._entry
        if entry is not None and entry[0] is ref:
            self._entry = None

    @property
    def holds_a_matrix(self) -> bool:
        return self._entry is not None


_CURRENT: ContextVar[GramCache | None] = ContextVar("noisescale_gram_cache", default=None)


@contextmanager
def use_gram_cache(cache: GramCache) -> Iterator[None]:
    """Make ``cache`` the one the ghost forms share Gram matrices through (a collector, around its hooks)."""
    token = _CURRENT.set(cache)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def sq_norm_of_sum_over_positions(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example ``|sum_t g_t x_t^T|_F^2`` for ``x: (B, T, m)`` and ``g: (B, T, n)``; returns ``(B,)``.

    Picks the ghost Gram form when ``T^2 (m + n) <= T m n`` (no more multiply-adds), else materialises.
    """
    return sequence_linear_sq_norms(x, g, with_bias=False)[0]


def sequence_linear_sq_norms(
    x: torch.Tensor, g: torch.Tensor, *, with_bias: bool, shared_input: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example ``|sum_t g_t x_t^T|_F^2`` and, if asked, ``|sum_t g_t|^2`` (a bias gradient's squared norm).

    Args:
        x: ``(B, T, m)`` inputs.
        g: ``(B, T, n)`` output gradients.
        with_bias: also return the bias term; otherwise the second value is ``None``.
        shared_input: the layer's input tensor as it came (``x`` is a view of it): its Gram matrix is shared
            with the next layer that reads the same tensor, through the current ``GramCache`` if there is one.

    The weight term takes the ghost form when ``T^2 (m + n) <= T m n`` (no more multiply-adds), else the
    materialised one.  With a ghost form the bias term comes from its output-gradient Gram matrix,
    ``|sum_t g_t|^2 = sum_{t,s} g_t . g_s``: a sum over ``B T^2`` entries instead of ``B T n``.

    Returns:
        ``(weight, bias)``, each ``(B,)`` (``bias`` is ``None`` unless ``with_bias``).
    """
    _, t, m = x.shape
    n = g.shape[-1]
    # Half-precision inputs (autocast) go into the products as they are, summed in float32 (bmm_float).
    if t * (m + n) <= m * n:  # on a tie the ghost form wins: its Gram products run faster, and it gives the bias
        # Ghost form: two (B, T, T) Gram matrices; no per-example weight gradient is built.
        cache = _CURRENT.get() if shared_input is not None else None
        gram_x = cache.get(shared_input) if cache is not None and shared_input is not None else None
        if gram_x is None:
            gram_x = bmm_float(x, x.transpose(1, 2))
            if cache is not None and shared_input is not None:
                cache.put(shared_input, gram_x)
        gram_g = bmm_float(g, g.transpose(1, 2))
        bias = gram_g.sum(dim=(1, 2)) if with_bias else None
        return gram_g.mul_(gram_x).sum(dim=(1, 2)), bias  # gram_x stays intact for a layer that shares it
    per_example = bmm_float(g.transpose(1, 2), x)  # (B, n, m)
    weight = torch.linalg.vector_norm(per_example, dim=(1, 2)).square()  # one pass, no temporary of squares
    return weight, (g.sum(dim=1, dtype=weight.dtype).square_().sum(dim=1) if with_bias else None)


def affine_map_sq_norms(x: torch.Tensor, g: torch.Tensor, *, weight: bool, bias: bool) -> dict[str, torch.Tensor]:
    """Per-example squared norms of ``y = x W^T + b`` (or ``x W + b``: the Frobenius norm ignores the transpose).

    Args:
        x: ``(B, *positions, d_in)`` input.
        g: ``(B, *positions, d_out)`` output gradient.
        weight: whether the weight needs a gradient.
        bias: whether there is a bias that needs one.

    Returns:
        ``{"weight": (B,), "bias": (B,)}``, each present only if asked for.
    """
    out: dict[str, torch.Tensor] = {}
    if x.dim() == 2:
        x, g = as_float(x), as_float(g)
        # Squared row norms by one operation each (vecdot: no (B, d) temporary of squares).
        g_sq = torch.linalg.vecdot(g, g)  # (B,)
        if weight:
            out["weight"] = g_sq * torch.linalg.vecdot(x, x)
        if bias:
            out["bias"] = g_sq
        return out
    g3 = flatten_sequence(g)  # (B, T, d_out)
    if weight:
        out["weight"], bias_sq = sequence_linear_sq_norms(flatten_sequence(x), g3, with_bias=bias, shared_input=x)
        if bias_sq is not None:
            out["bias"] = bias_sq
    elif bias:
        out["bias"] = as_float(g3).sum(dim=1).square_().sum(dim=1)
    return out


def linear_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.Linear.forward`` outputs for ``inputs``, in float64, and the size of the terms it sums."""
    x = first_tensor(inputs)
    weight, bias = module.weight, module.bias
    assert isinstance(weight, torch.Tensor)
    xw, w = x.double(), weight.double()
    b = bias.double() if isinstance(bias, torch.Tensor) else None
    out = torch.nn.functional.linear(xw, w, b)
    scale = float((xw.abs() @ w.abs().T).max()) if x.numel() else 0.0
    return out, scale + (float(b.abs().max()) if b is not None else 0.0)


@register_norm_rule(nn.Linear, reference=linear_reference)
def linear_rule(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example squared norms of ``weight`` and ``bias`` of an ``nn.Linear`` (see the module docstring)."""
    assert isinstance(module, nn.Linear)
    x = inputs[0]
    assert isinstance(x, torch.Tensor)
    return affine_map_sq_norms(
        x,
        grad_output,
        weight=module.weight.requires_grad,
        bias=module.bias is not None and module.bias.requires_grad,
    )
