"""The projection products of an ``nn.MultiheadAttention`` call, seen as they are computed (a dispatch mode).

Below autograd, ``ProductSpy`` sees every ATen operation of the layer's forward.  It records the matrix products
(``mm`` / ``addmm``) whose second operand is a view of a projection weight (recognised by its storage), with
their first operand and result, and the bias added to each (inside ``addmm``, or by the ``add`` right after an
``mm``).  Autocast first copies a weight, or a row block of it, to another dtype: the copy is followed as
standing for those rows.  It computes nothing itself and changes nothing computed, but the operations go through
Python, which slows the forward (``collectors.attention.hooks`` uses it to check the first call only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchedProduct", "ProductSpy", "storage_address"]

_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_ADD = torch.ops.aten.add.Tensor
_COPY = torch.ops.aten._to_copy.default


@dataclass
class DispatchedProduct:
    """One matrix product by a row block of a projection weight, as computed in the forward pass."""

    weight: str  # parameter name, relative to the layer
    start: int  # first weight row of the block
    rows: int
    x: torch.Tensor  # (L N, E_in) input rows
    out: torch.Tensor  # (L N, rows) product
    bias_start: int  # where the block's bias would start: separate q/k/v weights share in_proj_bias
    bias: str | None = None  # the bias whose block [bias_start, bias_start + rows) is added to this product


class ProductSpy(TorchDispatchMode):
    """Records the products by (views of) the layer's projection weights, and the bias additions.

    Args:
        weights: storage address -> weight name.
        biases: storage address -> bias name.
        bias_offsets: weight name -> the row of the bias its first row adds to.
    """

    def __init__(self, weights: dict[int, str], biases: dict[int, str], bias_offsets: dict[str, int]) -> None:
        super().__init__()
        # storage address -> (name, first row of the parameter it holds): the parameters, and the copies autocast
        # makes of them (or of their row blocks) in another dtype
        self.weights = {a: (n, 0) for a, n in weights.items()}
        self.biases = {a: (n, 0) for a, n in biases.items()}
        self.bias_offsets = bias_offsets
        self.products: list[DispatchedProduct] = []
        self.bias_adds = 0
        self.strange: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is _COPY and isinstance(args[0], torch.Tensor):
            self._follow_copy(args[0], out)
        elif func in _PRODUCTS:
            w = args[-1]
            found = self.weights.get(storage_address(w))
            if found is not None:
                name, base = found
                in_features = w.shape[0]
                if w.stride() != (1, in_features) or w.storage_offset() % in_features:
                    self.strange.append(f"{name} used with strides {w.stride()}")
                    return out
                start = base + w.storage_offset() // in_features
                product = DispatchedProduct(
                    name, start, w.shape[1], args[-2], out, start + self.bias_offsets.get(name, 0)
                )
                if func is torch.ops.aten.addmm.default:
                    self._bias_use(args[0], product)
                self.products.append(product)
        elif func is _ADD and len(args) == 2 and isinstance(args[1], torch.Tensor) and self.products:
            # mm then add: the bias goes to the product just made (a view of it, reshaped to (L, N, rows))
            last = self.products[-1]
            if isinstance(args[0], torch.Tensor) and storage_address(args[0]) == storage_address(last.out):
                self._bias_use(args[1], last)
        return out

    def _follow_copy(self, src: torch.Tensor, copy: Any) -> None:
        """Autocast casts a parameter (or a row block of it) before using it: the copy stands for those rows."""
        if not isinstance(copy, torch.Tensor) or not copy.is_contiguous():
            return
        for table in (self.weights, self.biases):
            found = table.get(storage_address(src))
            if found is not None and src.dim() >= 1 and src.stride()[-1] == 1:
                row = src.stride(0) if src.dim() == 2 else 1
                if src.storage_offset() % row == 0:
                    table[storage_address(copy)] = (found[0], found[1] + src.storage_offset() // row)

    def _bias_use(self, b: Any, product: DispatchedProduct) -> None:
        found = self.biases.get(storage_address(b)) if isinstance(b, torch.Tensor) else None
        if found is None:
            return
        name, base = found
        self.bias_adds += 1
        if base + b.storage_offset() == product.bias_start and b.numel() == product.rows and b.stride() == (1,):
            product.bias = name


def storage_address(t: torch.Tensor) -> int:
    """The address of ``t``'s storage: the same for a parameter and every view of it."""
    return t.untyped_storage().data_ptr()
