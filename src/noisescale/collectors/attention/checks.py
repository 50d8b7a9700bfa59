"""The checks that keep ``nn.MultiheadAttention``'s per-example norms from being silently wrong.

On the layer's first call, what the dispatch mode saw (``collectors.attention.dispatch``) is held to the layout
``collectors.attention.hooks`` assumes, and the autograd-graph walk (``collectors.attention.graph``) to the dispatch
mode; on every call, the walk's blocks must tile each measured parameter.  A mismatch raises
``UnsupportedLayerError``: another torch may compute the layer another way.
"""

from __future__ import annotations

import torch
from torch import nn

from noisescale.collectors.attention.dispatch import DispatchedProduct, ProductSpy, storage_address
from noisescale.collectors.attention.graph import GraphProduct
from noisescale.errors import FALLBACK_HINT, UnsupportedLayerError

__all__ = ["check_first_call", "check_walk", "uncovered"]


def check_first_call(
    spy: ProductSpy,
    module: nn.MultiheadAttention,
    params: dict[str, nn.Parameter],
    names: list[str],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    n: int,
) -> None:
    """Every measured weight and bias row in one product's block, inputs and output laid out as assumed.

    Args:
        spy: what the dispatch mode saw during the call.
        module: the layer; ``params``: its parameters as the forward saw them; ``names``: those measured.
        qkv: the call's query, key and value; ``out``: its output; ``n``: its number of examples.

    Raises:
        UnsupportedLayerError: naming what did not match.
    """
    query, key, value = qkv
    batch_first = module.batch_first and query.dim() == 3
    problems = list(spy.strange)
    problems += [
        f"{name}: rows {blocks} of {size} seen in the products"
        for name, blocks, size in _untiled(spy.products, names, params)
    ]
    if spy.bias_adds != sum(p.bias is not None for p in spy.products):
        problems.append("a bias was added to something other than its weight block's product")

    def lne(t: torch.Tensor) -> torch.Tensor:  # the layout the function works in: (L, N, E)
        if t.dim() == 2:
            return t.unsqueeze(1)
        return t.transpose(0, 1) if batch_first else t

    embed = module.embed_dim
    sources = {0: query, embed: key, 2 * embed: value}
    for p in spy.products:
        if p.weight == "out_proj.weight":
            # addmm adds out_proj.bias inside the product: the layer returns the product itself
            if not _same(p.out.reshape(-1, n, p.out.shape[-1]), lne(out)):
                problems.append("the output projection's product is not the layer's output")
            continue
        src = sources.get(p.start) if p.weight == "in_proj_weight" else _separate_source(p.weight, query, key, value)
        if src is None or not _same(p.x.reshape(-1, n, p.x.shape[-1]), lne(src)):
            problems.append(f"the input of the {p.weight} block at row {p.start} is not the query, key or value")
    if problems:
        raise UnsupportedLayerError(
            f"nn.MultiheadAttention computes its projections in a way noisescale does not recognise in this "
            f"torch version ({'; '.join(problems)}); pass on_unsupported='warn' to leave the layer out "
            f"(coverage is reported), or use {FALLBACK_HINT}"
        )


def _blocks(products: list[DispatchedProduct] | list[GraphProduct]) -> set[tuple[str, int, int, str | None, int, int]]:
    return {(p.weight, p.start, p.rows, p.bias, p.bias_start if p.bias else 0, storage_address(p.x)) for p in products}


def check_walk(spy: ProductSpy, walked: list[GraphProduct] | None) -> None:
    """First call: the graph walk must find the very products (blocks, biases, input rows) the dispatch mode saw."""
    if walked is None or _blocks(walked) != _blocks(spy.products):
        raise UnsupportedLayerError(
            "nn.MultiheadAttention's autograd graph does not show the projection products its forward computed "
            "in this torch version; pass on_unsupported='warn' to leave the layer out, or use " + FALLBACK_HINT
        )


def uncovered(products: list[GraphProduct], names: list[str], params: dict[str, nn.Parameter]) -> bool:
    """Whether some measured weight or bias row is not in exactly one product's block."""
    return bool(_untiled(products, names, params))


def _untiled(
    products: list[DispatchedProduct] | list[GraphProduct], names: list[str], params: dict[str, nn.Parameter]
) -> list[tuple[str, list[tuple[int, int]], int]]:
    """``(name, its sorted (start, rows) blocks, its rows)`` of each measured parameter the blocks do not tile."""
    blocks: dict[str, list[tuple[int, int]]] = {}
    for p in products:
        blocks.setdefault(p.weight, []).append((p.start, p.rows))
        if p.bias is not None:
            blocks.setdefault(p.bias, []).append((p.bias_start, p.rows))
    out = []
    for name in names:
        found, size = sorted(blocks.get(name, [])), params[name].shape[0]
        if not _tiles(found, size):
            out.append((name, found, size))
    return out


def _tiles(blocks: list[tuple[int, int]], size: int) -> bool:
    """Whether sorted ``(start, rows)`` blocks cover ``range(size)`` exactly once."""
    end = 0
    for start, rows in blocks:
        if start != end:
            return False
        end += rows
    return end == size


def _separate_source(weight: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor | None:
    return {"q_proj_weight": query, "k_proj_weight": key, "v_proj_weight": value}.get(weight)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, after casting ``b`` to ``a``'s dtype as autocast casts the inputs of a product."""
    return a.shape == b.shape and bool(torch.equal(a.detach(), b.detach().to(a.dtype)))
