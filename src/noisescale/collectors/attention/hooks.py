"""Per-example squared gradient norms of ``nn.MultiheadAttention``'s projections.

``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward``: no submodule runs (not even
``out_proj``), so no module hook sees a projection's input or output gradient.  The products by the projection
weights (``mm`` / ``addmm``) are found instead in the autograd graph the call records
(``collectors.attention.graph``): each product's node saves its first operand (the projection's input), and a
pre-hook on it receives the product's gradient (the projection's output gradient).

The function lays its inputs out as ``(L, N, E)`` (positions, batch, features) and multiplies them flattened to
``(L N, E)``, so row ``l N + n`` belongs to example ``n``.  Reshaped to ``(N, L, E)``, each product goes through
the same ghost or materialised form as ``nn.Linear`` on sequences (``rules.linear.sequence_linear_sq_norms``;
Goodfellow 2015, Li et al. 2022).  A packed ``in_proj_weight`` is multiplied whole (self-attention) or in row
blocks for query, key and value; the blocks are disjoint, so a weight's squared norm is the sum over its blocks.
A bias block is added to its weight block's product (inside ``addmm`` or right after ``mm``), so its gradient is
the sum over positions of that product's gradient.

The first call is also watched by a dispatch mode, below autograd, which sees the products being computed
(through autocast's casts of the weights) and changes nothing computed; it checks the layout: the products must
cover every row of every projection weight and bias exactly once, each input block must equal the query, key or
value it projects, the output projection's product must be the layer's output, and the graph walk must find the
same products.  Another implementation (a later torch) is refused with an error, not measured wrongly.  Under
saved-tensor hooks (activation checkpointing, offloading) the walk may not read the saved inputs, which would
unpack them early, so every call goes through the dispatch mode there, at about 40% more forward time on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from noisescale.collectors.attention.checks import check_first_call, check_walk, uncovered
from noisescale.collectors.attention.dispatch import ProductSpy, storage_address
from noisescale.collectors.attention.graph import walk_products
from noisescale.collectors.rules.linear import sequence_linear_sq_norms
from noisescale.collectors.rules.registry import register_layer_hooks
from noisescale.collectors.saved_inputs import Held, SavedInputs, keep_inputs, saved_tensor_hooks_active
from noisescale.errors import FALLBACK_HINT, UnsupportedLayerError

__all__ = ["AttentionProjections", "attention_param_names", "unsupported_attention"]

Emit = Callable[[str, torch.Tensor], None]
"""``(parameter name relative to the layer, per-example squared norms (N,))``."""


def unsupported_attention(module: nn.Module) -> str | None:
    """Why this ``nn.MultiheadAttention`` cannot be measured per example, or ``None`` when it can."""
    assert isinstance(module, nn.MultiheadAttention)
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True: its bias_k and bias_v have no per-example rule"
    return None


def attention_param_names(module: nn.Module) -> list[str]:
    """The layer's trainable projection parameters, as named from the layer (``out_proj.weight`` included)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


@dataclass
class _Call:
    """One forward call's products, waiting for their gradients in the backward pass."""

    n: int  # examples
    pending: dict[str, int]  # parameter -> products still to come
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


class AttentionProjections:
    """The hooks of one ``nn.MultiheadAttention``: per-example squared norms of its projection parameters.

    Args:
        module: the layer.
        names: the parameters to measure, named from the layer (``in_proj_weight``, ``out_proj.bias``, ...).
        emit: receives, once per forward call and parameter, ``(name, (N,) squared norms)`` during backward.
        examples: receives the call's number of examples once per call, with its first gradient.

    Raises:
        UnsupportedLayerError: from the first forward call, when the products found do not match the layout.
    """

    def __init__(self, module: nn.Module, names: list[str], emit: Emit, examples: Callable[[int], None]) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        self.module = module
        self.names = names
        self._emit = emit
        self._examples = examples
        self._layout_checked = False  # the products' layout, by the dispatch mode on the first call
        self._walk_checked = False  # the graph walk against the dispatch mode, on the first call without hooks
        self._spy: ProductSpy | None = None
        self._params: dict[str, nn.Parameter] = {}
        # Set by the collector: the context its norms are computed in (its sketch; ``LayerHooks``).
        self.context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext

    def install(self) -> list[RemovableHandle]:
        """Register the forward hooks; returns their handles."""
        m = self.module
        # Both hooks run eagerly even inside a torch.compile'd model (a graph break at each), and so does the
        # forward between them; a compiled forward would leave no products to see.  Partials of the class's
        # functions, not wrapped bound methods: copy.deepcopy of the model then copies this object with its hooks
        # (as it does the other layers' bound-method hooks) instead of sharing it.
        before, after = _eager_hooks()
        return [
            m.register_forward_pre_hook(functools.partial(before, self), with_kwargs=True),
            m.register_forward_hook(functools.partial(after, self), with_kwargs=True, always_call=True),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        # As the forward sees them: FSDP2 swaps in unsharded parameters before it and reshards after it.
        self._params = dict(module.named_parameters())
        # The dispatch mode slows the layer's forward (about 40% on a CPU): only on the first call, which
        # checks the graph walk against it, and under saved-tensor hooks, where the walk may not read the inputs.
        if self._walk_checked and not saved_tensor_hooks_active():
            return
        params = self._params
        weights = {storage_address(params[n]): n for n in self.names if n.endswith("weight")}
        biases = {storage_address(params[n]): n for n in self.names if n.endswith("bias")}
        embed = self.module.embed_dim
        self._spy = ProductSpy(weights, biases, {"k_proj_weight": embed, "v_proj_weight": 2 * embed})
        self._spy.__enter__()

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        spy, self._spy = self._spy, None
        if spy is not None:
            spy.__exit__(None, None, None)
        elif not self._walk_checked or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        out = output[0] if isinstance(output, tuple) else output
        if not (isinstance(out, torch.Tensor) and out.requires_grad and out.grad_fn is not None):
            return
        query, key, value = _qkv(args, kwargs)
        batch_first = self.module.batch_first and query.dim() == 3
        n = 1 if query.dim() == 2 else query.shape[0 if batch_first else 1]
        if spy is not None and not self._layout_checked:
            check_first_call(spy, self.module, self._params, self.names, (query, key, value), out, n)
            self._layout_checked = True
        products: list[tuple[str, str | None, torch.Tensor, Any]]  # (weight, bias, input rows, node)
        if spy is not None and saved_tensor_hooks_active():
            products = [(p.weight, p.bias, p.x, p.out.grad_fn) for p in spy.products]
        else:
            walked = walk_products(out, (query, key, value), self._params)
            if spy is not None:
                check_walk(spy, walked)
                self._walk_checked = True
            if walked is None or uncovered(walked, self.names, self._params):
                raise UnsupportedLayerError(
                    "nn.MultiheadAttention recorded an autograd graph noisescale does not recognise in this call "
                    "(its first call was recognised); pass on_unsupported='warn' to leave the layer out, or use "
                    + FALLBACK_HINT
                )
            products = [(p.weight, p.bias, p.x, p.node) for p in walked]
        call = _Call(n=n, pending={})
        first = True
        for weight, bias, x, node in products:
            if node is None:
                continue
            for name in (weight, bias):
                if name is not None and name in self.names:
                    call.pending[name] = call.pending.get(name, 0) + 1
            # Each hook holds its own product's input only: the output projection's input comes from the input
            # projection's node, so one holder of both would close a cycle through autograd's nodes.
            kept = keep_inputs((x,))
            node.register_prehook(functools.partial(self._on_grad, call, weight, bias, kept, first))
            first = False

    def _on_grad(
        self,
        call: _Call,
        weight: str,
        bias: str | None,
        held: Held,
        count_examples: bool,
        grad_outputs: tuple[torch.Tensor | None, ...],
    ) -> None:
        grad = grad_outputs[0]  # a product node has one output
        if grad is None:
            return
        kept = held.take()
        if kept is None:  # pragma: no cover - autograd refuses a second pass through a graph it did not keep
            return
        (x,) = kept.unpack() if isinstance(kept, SavedInputs) else kept
        assert isinstance(x, torch.Tensor)
        n = call.n
        with torch.no_grad(), self.context():  # no_grad: backward(create_graph=True) keeps building a graph otherwise
            # rows l N + n -> (N, L, features)
            x3 = x.reshape(-1, n, x.shape[-1]).transpose(0, 1)
            g3 = grad.reshape(-1, n, grad.shape[-1]).transpose(0, 1)
            want_w, want_b = weight in self.names, bias is not None and bias in self.names
            w_sq, b_sq = sequence_linear_sq_norms(x3, g3, with_bias=want_b)
        if want_w:
            self._add(call, weight, w_sq)
        if want_b and b_sq is not None:
            assert bias is not None
            self._add(call, bias, b_sq)
        if count_examples:
            self._examples(n)

    def _add(self, call: _Call, name: str, sq: torch.Tensor) -> None:
        # A packed weight's blocks arrive one by one: emit their sum with the last one.
        total = call.sums.pop(name, None)
        total = sq if total is None else total + sq
        call.pending[name] -= 1
        if call.pending[name]:
            call.sums[name] = total
        else:
            self._emit(name, total)


@functools.cache
def _eager_hooks() -> tuple[Callable[..., None], Callable[..., None]]:
    # Built on first use: torch.compiler.disable imports torch._dynamo, too heavy for `import noisescale`.
    return (
        torch.compiler.disable(AttentionProjections._before),
        torch.compiler.disable(AttentionProjections._after),
    )


def _qkv(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("query", "key", "value")
    got = list(args[:3]) + [kwargs[k] for k in names[len(args[:3]) :]]
    return got[0], got[1], got[2]


register_layer_hooks(
    nn.MultiheadAttention, hooks=AttentionProjections, params=attention_param_names, refuse=unsupported_attention
)
