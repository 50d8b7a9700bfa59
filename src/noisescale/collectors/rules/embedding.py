"""Per-example squared gradient norms of ``nn.Embedding``.

For one example with token ids ``idx_t`` (``t`` over its ``T`` positions) and output gradients ``g_t`` (``D``
wide), the weight gradient is ``W_i = sum_t onehot(idx_t) g_t^T``: row ``v`` holds the sum of the ``g_t`` of the
positions that read token ``v``.  Hence

    |W_i|^2 = sum_v |sum_{t: idx_t = v} g_t|^2 = sum_{t,s} [idx_t == idx_s] (g_t . g_s).

Positions reading ``padding_idx`` get no gradient, so their ``g_t`` is zeroed first.  Three exact forms, the
cheapest chosen per call from ``T``, ``D`` and the vocabulary size ``V`` (``embedding_form``):

* ghost: the ``(B, T, T)`` Gram matrix of the ``g_t`` masked by ``[idx_t == idx_s]``, ``O(B T^2 D)``;
* dense: add every ``g_t`` into row ``idx_t`` of a zeroed ``(B, V, D)`` buffer (``index_add``) and square,
  ``O(B (V + T) D)``; taken only for a small vocabulary (``V <= 2 T``: position embeddings, characters);
* segment sums: sort each example's ids, add the ``g_t`` of equal ids into one row each (``index_add``) and
  square, ``O(B T (D + log T))``; never builds the ``(V, D)`` per-example gradient.

With ``GNSMonitor(sketch=k)`` a fourth, unbiased estimate: a count sketch of the vocabulary side (each id a random
sign and one of ``k`` buckets, drawn afresh each step; ``rules.sketch``), ``O(B (T + k) D)`` without a sort, where
it costs at most half the cheapest exact form.

Neither needs the weight, so ``max_norm`` (which renormalises rows in place, outside autograd) and ``sparse``
gradients (same values, sparse layout) are handled.  ``scale_grad_by_freq`` divides each token's gradient by
its frequency in the *whole* batch, so a per-example gradient is not defined; the rule refuses it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from noisescale.collectors.rules.common import as_float
from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.collectors.rules.sketch import PAYS, current_sketch
from noisescale.errors import FALLBACK_HINT, UnsupportedLayerError

__all__ = [
    "EmbeddingForm",
    "embedding_form",
    "embedding_reference",
    "embedding_rule",
    "embedding_sq_norms",
    "refuse_positions_shared_by_the_batch",
]


EmbeddingForm = Literal["ghost", "dense", "segments", "sketch"]

# Cost of each form in nanoseconds per (example x embedding column) on a 2-core AVX2 CPU, fitted at B = 32,
# D = 128: ghost 0.68 ms at T = 64; dense 0.28 ms at T = 64, V = 96; segment sums 3.5 ms at T = 256.  The
# matrix product runs near peak speed, the others are memory-bound, hence the different weights.
_GHOST_PER_T2, _GHOST_PER_T = 0.025, 1.0
_DENSE_PER_ROW = 0.55
_SEGMENTS_PER_T = 3.4
# The count sketch adds each signed g_t into one of k rows (index_add, like the dense form) after a gather.
_SKETCH_PER_T, _SKETCH_PER_ROW = 0.85, 0.55


def embedding_form(t: int, vocab: int | None = None, sketch: int | None = None) -> EmbeddingForm:
    """The cheapest form for ``T`` positions per example and a vocabulary of ``V`` rows.

    ``vocab=None`` (unknown) rules the dense form out; so does ``V > 2 T``, which bounds its buffer by twice the
    output gradient's size.  With ``sketch=k`` (``GNSMonitor(sketch=k)``) the count sketch over ``k`` buckets is
    taken where it costs at most half the cheapest exact form (``sketch.PAYS``); it needs ``V``.  Every form's
    cost is linear in the width ``D``, so it does not enter.  See the module docstring for the forms and the cost
    constants for where they come from.
    """
    costs: dict[EmbeddingForm, float] = {
        "ghost": _GHOST_PER_T2 * t * t + _GHOST_PER_T * t,
        "segments": _SEGMENTS_PER_T * t,
    }
    if vocab is not None and vocab <= 2 * t:
        costs["dense"] = _DENSE_PER_ROW * (vocab + t)
    best = min(costs, key=costs.__getitem__)
    if sketch is not None and vocab is not None:
        if _SKETCH_PER_T * t + _SKETCH_PER_ROW * sketch <= PAYS * costs[best]:
            return "sketch"
    return best


def embedding_sq_norms(
    idx: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    padding_idx: int | None = None,
    num_embeddings: int | None = None,
    form: EmbeddingForm | None = None,
) -> torch.Tensor:
    """Per-example ``sum_{t,s} [idx_t == idx_s] (g_t . g_s)``, the squared norm of an embedding's weight gradient.

    Args:
        idx: ``(B, *positions)`` integer token ids (``(B,)`` for one token per example).
        grad_output: ``(B, *positions, D)`` gradient of the loss with respect to the embedding's output.
        padding_idx: id whose positions receive no gradient (``nn.Embedding.padding_idx``), or ``None``.
        num_embeddings: the vocabulary size ``V`` (every id is below it); ``None`` rules out the dense form.
        form: force a form (tests); ``None`` picks the cheapest with ``embedding_form`` (``"sketch"`` only with a
            sketch current, ``rules.sketch.use_sketch``).

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
    sketch = current_sketch()
    if form is None:
        form = embedding_form(t, num_embeddings, None if sketch is None else sketch.k)
    if form == "sketch":
        if sketch is None or num_embeddings is None:
            raise ValueError("the sketch form needs a current sketch (use_sketch) and num_embeddings")
        # Count sketch: example b's gradient row of token v, times sign(v), added into row b k + bucket(v).
        sign, bucket = sketch.count_sketch(num_embeddings, ids.device)
        k = sketch.k
        rows = bucket[ids] + torch.arange(b, device=ids.device).unsqueeze(1) * k
        signed = g * sign.to(g.dtype)[ids].unsqueeze(-1)
        buckets = g.new_zeros(b * k, d).index_add_(0, rows.reshape(-1), signed.reshape(b * t, d))
        return torch.linalg.vector_norm(buckets.view(b, -1), dim=1).square()
    if form == "ghost":
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (B, T, T)
        gram = torch.bmm(g, g.transpose(1, 2))  # (B, T, T)
        return gram.masked_fill_(~same, 0.0).sum(dim=(1, 2))
    if form == "dense":
        if num_embeddings is None:
            raise ValueError("the dense form needs num_embeddings")
        # Row b * V + id of a (B * V, D) buffer collects example b's gradient rows of token id.
        rows = ids + torch.arange(b, device=ids.device).unsqueeze(1) * num_embeddings
        dense = g.new_zeros(b * num_embeddings, d).index_add_(0, rows.reshape(-1), g.reshape(b * t, d))
        return torch.linalg.vector_norm(dense.view(b, -1), dim=1).square()
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
            f"use {FALLBACK_HINT}"
        )
    idx = inputs[0]
    assert isinstance(idx, torch.Tensor)
    if idx.dim() == 0:
        raise UnsupportedLayerError(
            "nn.Embedding got a 0-d index tensor: per-example norms need a leading batch dimension, "
            "e.g. shape (B,) or (B, T)"
        )
    return {
        "weight": embedding_sq_norms(
            idx, as_float(grad_output), padding_idx=module.padding_idx, num_embeddings=module.num_embeddings
        )
    }


def refuse_positions_shared_by_the_batch(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
    """First-call check of an ``nn.Embedding``: refuse positions ``0, 1, ..., T-1`` looked up once for the batch.

    nanoGPT-style models embed ``torch.arange(T)``, shape ``(T,)``, and add the ``(T, D)`` result to every
    example: autograd sums its gradient over the batch, and the hooks would take the ``T`` positions for ``T``
    examples.  When ``T`` differs from the batch size, ``collect`` notices the disagreement; when they are equal
    nothing else would, and the layer's "per-example" norms would be per-position norms.  A 1-D index that is
    exactly ``0..T-1`` is taken for such positions (a batch of token ids rarely is).  Reads one number from the
    device, once per layer with a 1-D input.

    Raises:
        UnsupportedLayerError: for such an index.
    """
    idx = inputs[0] if inputs else None
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.numel() > 1):
        return
    if bool(torch.equal(idx, torch.arange(idx.numel(), device=idx.device, dtype=idx.dtype))):
        raise UnsupportedLayerError(
            f"an nn.Embedding({module.num_embeddings}, {module.embedding_dim}) was called with the positions "
            f"0..{idx.numel() - 1} as one (T,) index shared by the whole batch: its output is broadcast over the "
            "examples, so it has no per-example gradient (and its T rows would be counted as examples). Look the "
            "positions up once per example, shape (B, T), e.g. torch.arange(T).expand(B, T), or use " + FALLBACK_HINT
        )


def embedding_reference(module: nn.Module, inputs: tuple[object, ...]) -> tuple[torch.Tensor, float]:
    """What ``nn.Embedding.forward`` outputs for ``inputs`` (rows of the weight at the indices), and their size.

    The weight is read as it is: ``max_norm`` has renormalised it in place already, if the layer asked for that.
    """
    idx = inputs[0] if inputs else None
    weight = module.weight
    if not (isinstance(idx, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise TypeError("the first input is not an index tensor")
    out = torch.nn.functional.embedding(idx, weight.double())
    return out, float(weight.abs().max())


register_norm_rule(nn.Embedding, check=refuse_positions_shared_by_the_batch, reference=embedding_reference)(
    embedding_rule
)
