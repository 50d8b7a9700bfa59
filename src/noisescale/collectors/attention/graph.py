"""The projection products of one ``nn.MultiheadAttention`` call, read from the autograd graph it recorded.

``F.multi_head_attention_forward`` multiplies its flattened inputs by (row blocks of) the projection weights with
``mm`` or ``addmm``; autograd records each product as an ``MmBackward0`` or ``AddmmBackward0`` node whose second
operand leads, through a transpose, possibly a split along rows and autocast's dtype casts, to the weight's
``AccumulateGrad`` node, and
which saves its first operand (the input rows).  Walking the call's part of the graph, from the layer's output
back to its inputs, finds every product, its weight block, the bias block added to it (inside ``addmm``, or by
the ``AddBackward0`` right after an ``mm``) and its saved input: all that ``collectors.attention.hooks`` needs, at no
cost in the forward pass.  The dispatch mode of that module checks this walk on the layer's first call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["GraphProduct", "walk_products"]

_PRODUCT_INPUT = {"MmBackward0": "_saved_self", "AddmmBackward0": "_saved_mat1"}
_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
_MAX_NODES = 512  # an attention call records a few dozen; more means the walk left the layer


@dataclass
class GraphProduct:
    """A product by a row block of a projection weight.

    Attributes:
        weight: the weight's name, relative to the layer.
        start: first weight row of the block; ``rows``: its number of rows.
        node: the product's autograd node (its pre-hook receives the product's output gradient).
        x: the saved first operand, the input rows ``(L N, E_in)``.
        bias: the bias added to the product, if any; ``bias_start``: the first bias entry of its block.
    """

    weight: str
    start: int
    rows: int
    node: Any
    x: torch.Tensor
    bias: str | None = None
    bias_start: int = 0


def walk_products(
    output: torch.Tensor, inputs: Iterable[torch.Tensor], params: dict[str, nn.Parameter]
) -> list[GraphProduct] | None:
    """The products by ``params`` between ``output`` and ``inputs`` (the query, key and value); ``None`` if the
    walk met more nodes than an attention call records.

    Reads each product's saved input, so it must not run under saved-tensor hooks (checkpointing would
    recompute the block for it).
    """
    by_id = {id(p): name for name, p in params.items()}
    stop = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
    products: dict[int, GraphProduct] = {}
    adds: list[Any] = []
    seen: set[int] = set()
    todo = [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        if len(seen) > _MAX_NODES:
            return None
        kind = type(node).__name__
        if kind == "AccumulateGrad":
            continue
        if kind in _PRODUCT_INPUT:
            block = _param_block(node.next_functions[-1], by_id, transposed=True)
            if block is not None:
                weight, start, rows = block
                x = getattr(node, _PRODUCT_INPUT[kind])
                product = GraphProduct(weight, start, rows, node, x)
                if kind == "AddmmBackward0":
                    _attach_bias(product, _param_block(node.next_functions[0], by_id, transposed=False))
                products[id(node)] = product
        elif kind == "AddBackward0":
            adds.append(node)
        todo.extend(fn for fn, _ in node.next_functions)
    for add in adds:  # mm, then the bias added to its (reshaped) output
        (a, _), (b, b_nr) = add.next_functions
        before = products.get(id(_through_reshapes(a)))
        if before is not None and before.bias is None:
            _attach_bias(before, _param_block((b, b_nr), by_id, transposed=False))
    return list(products.values())


def _attach_bias(product: GraphProduct, block: tuple[str, int, int] | None) -> None:
    if block is not None and block[2] == product.rows:
        product.bias, product.bias_start = block[0], block[1]


def _through_reshapes(node: Any) -> Any:
    while node is not None and type(node).__name__ in _RESHAPES:
        node = node.next_functions[0][0]
    return node


def _through_casts(node: Any, nr: int) -> tuple[Any, int]:
    """Past the dtype casts of autocast (a cast copies a tensor whole, so rows keep their place)."""
    while node is not None and type(node).__name__ == "ToCopyBackward0":
        node, nr = node.next_functions[0]
    return node, nr


def _param_block(edge: tuple[Any, int], by_id: dict[int, str], *, transposed: bool) -> tuple[str, int, int] | None:
    """``(parameter name, first row, rows)`` when ``edge`` leads to (a row block of) a parameter, else ``None``."""
    node, nr = edge
    if transposed:
        if node is None or type(node).__name__ != "TBackward0":
            return None
        node, nr = node.next_functions[0]
    node, nr = _through_casts(node, nr)
    if node is None:
        return None
    start, rows = 0, None
    kind = type(node).__name__
    if kind in ("SplitWithSizesBackward0", "SplitBackward0"):
        if node._saved_dim != 0:
            return None
        if kind == "SplitWithSizesBackward0":
            sizes = list(node._saved_split_sizes)
            start, rows = sum(sizes[:nr]), sizes[nr]
        else:
            size = node._saved_split_size
            start, rows = nr * size, size
        node, _ = _through_casts(*node.next_functions[0])
    if node is None or type(node).__name__ != "AccumulateGrad":
        return None
    name = by_id.get(id(node.variable))
    if name is None:
        return None
    total = node.variable.shape[0]
    return name, start, min(rows, total - start) if rows is not None else total
