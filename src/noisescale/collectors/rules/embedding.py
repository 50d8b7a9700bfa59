"""Per-example squared gradient norms of ``nn.Embedding``.

For one example with token ids ``idx_t`` (``t`` over its ``T`` positions) and output gradients ``g_t`` (``D``
wide), the weight gradient is ``W_i = sum_t onehot(idx_t) g_t^T``: row ``v`` holds the sum of the ``g_t`` of the
positions that read token ``v``.  Hence

    |W_i|^2 = sum_v |sum_{t: idx_t = v} g_t|^2 = sum_{t,s} [idx_t == idx_s] (g_t . g_s).

Positions reading ``padding_idx`` get no gradient, so their ``g_t`` is zeroed first.  Two exact forms, the
cheaper one chosen per call from ``T`` and ``D``:

* ghost: the ``(B, T, T)`` Gram matrix of the ``g_t`` masked by ``[idx_t == idx_s]``, ``O(B T^2 D)``;
* segment sums: sort each example's ids, add the ``g_t`` of equal ids into one row each (``index_add``) and
  square, ``O(B T (D + log T))``; never builds the ``(vocab, D)`` per-example gradient.

Neither needs the weight, so ``max_norm`` (which renormalises rows in place, outside autograd) and ``sparse``
gradients (same values, sparse layout) are handled.  ``scale_grad_by_freq`` divides each token's gradient by
its frequency in the *whole* batch, so a per-example gradient is not defined; the rule refuses it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from noisescale.collectors.rules.common import as_float
from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.errors import UnsupportedLayerError

__all__ = ["embedding_ghost_is_cheaper", "embedding_rule", "embedding_sq_norms"]


def embedding_ghost_is_cheaper(t: int, d: int) -> bool:
    """Whether the ghost form beats segment sums for ``T`` positions of width ``D`` per example.

    Ghost: ``T^2 D`` multiply-adds in one batched matrix product, which runs near peak speed.  Segment sums:
    about ``T (D + log T)`` work, but in a sort, a gather and an ``index_add`` that are memory-bound and run far
    below peak.  On a CPU the crossover measured near ``T = 100`` at ``D = 128`` (ghost 0.76 ms vs segments 1.14
    ms at ``B = 32, T = 64``; 3.1 ms vs 1.8 ms at ``B = 8, T = 256``), so the segment work is weighted 96 times.
    """
    return t * d <= 96 * (d + math.ceil(math.log2(max(t, 2))))


def embedding_sq_norms(idx: torch.Tensor, grad_output: torch.Tensor, *, padding_idx: int | None = None) -> torch.Tensor:
    """Per-example ``sum_{t,s} [idx_t == idx_s] (g_t . g_s)``, the squared norm of an embedding's weight gradient.

    Args:
        idx: ``(B, *positions)`` integer token ids (``(B,)`` for one token per example).
        grad_output: ``(B, *positions, D)`` gradient of the loss with respect to the embedding's output.
        padding_idx: id whose positions receive no gradient (``nn.Embedding.padding_idx``), or ``None``.

    Returns:
        ``(B,)`` squared Frobenius norms, in ``grad_output``'s dtype.
    """
    b = idx.shape[0]
    ids = idx.reshape(b, -1)  # (B, T)
    t = ids.shape[1]
    g = grad_output.reshape(b, t, -1)  # (B, T, D)
    d = g.shape[2]
    if padding_idx is not None:
        g = g.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
    if t == 1:
        return g.square().sum(dim=(1, 2))
    if embedding_ghost_is_cheaper(t, d):
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (B, T, T)
        gram = torch.bmm(g, g.transpose(1, 2))  # (B, T, T)
        return gram.masked_fill(~same, 0.0).sum(dim=(1, 2))
    # Segment sums: after a per-example sort equal ids are adjacent; number the runs 0.. within each example and
    # add each run's gradients into its own row of a (B * T, D) buffer (at most T runs per example).
    sorted_ids, order = ids.sort(dim=1)
    g_sorted = g.gather(1, order.unsqueeze(-1).expand(b, t, d))
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = starts.cumsum(dim=1) - 1  # (B, T), in [0, T)
    rows = run + torch.arange(b, device=ids.device).unsqueeze(1) * t
    sums = g.new_zeros(b * t, d).index_add_(0, rows.reshape(-1), g_sorted.reshape(b * t, d))
    return sums.view(b, t, d).square().sum(dim=(1, 2))


@register_norm_rule(nn.Embedding)
def embedding_rule(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example squared norm of ``weight`` of an ``nn.Embedding`` (see the module docstring).

    Raises:
        UnsupportedLayerError: for ``scale_grad_by_freq=True`` (gradients depend on the whole batch).
    """
    assert isinstance(module, nn.Embedding)
    if not module.weight.requires_grad:
        return {}
    if module.scale_grad_by_freq:
        raise UnsupportedLayerError(
            "nn.Embedding(scale_grad_by_freq=True) divides each token's gradient by its frequency in the whole "
            "batch, so per-example gradients are not defined; construct it with scale_grad_by_freq=False, or "
            "use source='microbatch'"
        )
    idx = inputs[0]
    assert isinstance(idx, torch.Tensor)
    if idx.dim() == 0:
        raise UnsupportedLayerError(
            "nn.Embedding got a 0-d index tensor: per-example norms need a leading batch dimension, "
            "e.g. shape (B,) or (B, T)"
        )
    return {"weight": embedding_sq_norms(idx, as_float(grad_output), padding_idx=module.padding_idx)}
