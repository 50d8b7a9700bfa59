"""Tied input embedding and output head (``head.weight is embedding.weight``, as in GPT-2): the cross term.

The tied weight's per-example gradient is the sum of the two layers' parts, ``A_i + H_i``, with
``A_i = sum_t onehot(idx_t) g_t^T`` (embedding: token ids ``idx_t``, output gradients ``g_t``) and
``H_i = sum_s u_s h_s^T`` (head: inputs ``h_s``, output gradients ``u_s`` over the vocabulary).  So

    |A_i + H_i|^2 = |A_i|^2 + |H_i|^2 + 2 <A_i, H_i>,   <A_i, H_i> = sum_{s,t} u_s[idx_t] (h_s . g_t).

The two rules give ``|A_i|^2`` and ``|H_i|^2``; this module adds ``2 <A_i, H_i>`` from a ``(B, S, T)`` gather of
the head's output gradients at the token ids and a ``(B, S, T)`` batched product, without ever forming the
``(V, D)`` per-example gradients.  Whichever layer's gradient arrives second in the backward pass computes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from noisescale.collectors.rules.common import as_float
from noisescale.collectors.rules.registry import register_tied_weights

__all__ = ["TiedEmbeddingHead", "tied_embedding_head"]


class TiedEmbeddingHead:
    """The cross term of one ``nn.Embedding`` / ``nn.Linear`` pair sharing their weight.

    Args:
        embedding: the input embedding.
        head: the output projection whose ``weight`` is ``embedding.weight``.
    """

    weight = "weight"

    def __init__(self, embedding: nn.Embedding, head: nn.Linear) -> None:
        self.embedding = embedding
        self.head = head
        self.modules: tuple[nn.Module, nn.Module] = (embedding, head)
        self._ids: torch.Tensor | None = None
        self._pending_head: tuple[torch.Tensor, torch.Tensor] | None = None  # (u at the ids (B, S, T), h (B, S, D))
        self._pending_embedding: torch.Tensor | None = None  # g (B, T, D), zero at padding positions

    def forward(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        """The embedding's forward pass gives the token ids; the head's needs nothing."""
        if module is self.embedding:
            ids = inputs[0]
            assert isinstance(ids, torch.Tensor)
            self.saw_ids(ids)

    def backward(self, module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> torch.Tensor | None:
        """``2 <A_i, H_i>`` once both layers' output gradients arrived, else ``None``."""
        if module is self.head:
            h = inputs[0]
            assert isinstance(h, torch.Tensor)
            return self.on_head_grad(h, grad_output)
        return self.on_embedding_grad(grad_output)

    def saw_ids(self, ids: torch.Tensor) -> None:
        """Called on the embedding's forward: the token ids of the current forward pass."""
        self._ids = ids.reshape(ids.shape[0], -1)  # (B, T)

    def on_head_grad(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
        """The head's input and output gradient arrived; returns ``2 <A_i, H_i>`` if the embedding's came first."""
        if self._ids is None:
            return None
        b = u.shape[0]
        u3 = as_float(u).reshape(b, -1, u.shape[-1])  # (B, S, V)
        h3 = as_float(h).reshape(b, -1, h.shape[-1])  # (B, S, D)
        at_ids = u3.gather(2, self._ids.unsqueeze(1).expand(b, u3.shape[1], self._ids.shape[1]))  # (B, S, T)
        if self._pending_embedding is not None:
            g = self._pending_embedding
            self._pending_embedding = None
            return self._cross(at_ids, h3, g)
        self._pending_head = (at_ids, h3)
        return None

    def on_embedding_grad(self, g: torch.Tensor) -> torch.Tensor | None:
        """The embedding's output gradient arrived; returns ``2 <A_i, H_i>`` if the head's came first."""
        if self._ids is None:
            return None
        b = g.shape[0]
        g3 = as_float(g).reshape(b, -1, g.shape[-1])  # (B, T, D)
        if self.embedding.padding_idx is not None:  # those positions get no gradient
            g3 = g3.masked_fill((self._ids == self.embedding.padding_idx).unsqueeze(-1), 0.0)
        if self._pending_head is not None:
            at_ids, h3 = self._pending_head
            self._pending_head = None
            return self._cross(at_ids, h3, g3)
        self._pending_embedding = g3
        return None

    @staticmethod
    def _cross(at_ids: torch.Tensor, h3: torch.Tensor, g3: torch.Tensor) -> torch.Tensor:
        # (h_s . g_t) for every pair of positions, weighted by u_s[idx_t]: (B, S, T) -> (B,)
        return 2.0 * (at_ids * torch.bmm(h3, g3.transpose(1, 2))).sum(dim=(1, 2))

    def reset(self) -> None:
        self._ids = None
        self._pending_head = None
        self._pending_embedding = None


@register_tied_weights
def tied_embedding_head(modules: Sequence[nn.Module]) -> TiedEmbeddingHead | None:
    """The form for a weight used by exactly one ``nn.Embedding`` and one ``nn.Linear`` (its output head)."""
    if len(modules) != 2:
        return None
    emb = [m for m in modules if isinstance(m, nn.Embedding)]
    head = [m for m in modules if isinstance(m, nn.Linear)]
    if len(emb) != 1 or len(head) != 1 or emb[0].weight is not head[0].weight:
        return None
    return TiedEmbeddingHead(emb[0], head[0])
