"""Counting the examples of a batch, for frameworks whose hooks see the batch but not its size.

The default takes the length of the first tensor found in the batch (depth first through mappings, lists and
tuples), which is the number of examples for the usual ``(x, y)`` tuples and ``{"input_ids": ...}`` dicts.  A
batch whose first tensor is not laid out examples-first needs a function of your own (``batch_size_fn``): the
count sets the units of B_simple, and the ``example`` source checks it against what its hooks saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from noisescale.errors import ConfigError

__all__ = ["BatchSizeFn", "count_examples", "first_tensor_rows"]

BatchSizeFn = Callable[[Any], int]
"""``batch -> number of examples`` in it."""


def first_tensor_rows(batch: Any) -> int | None:
    """The length of the first tensor with at least one dimension in ``batch``, or ``None`` if it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        rows = first_tensor_rows(item)
        if rows is not None:
            return rows
    return None


def count_examples(batch: Any, batch_size_fn: BatchSizeFn | None) -> int:
    """Examples in ``batch``: ``batch_size_fn(batch)`` if given, else the first tensor's length.

    Raises:
        ConfigError: no tensor in the batch and no ``batch_size_fn``, or a count that is not a positive int.
    """
    if batch_size_fn is not None:
        n = batch_size_fn(batch)
        if isinstance(n, torch.Tensor) and n.numel() == 1:
            n = int(n.item())
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"batch_size_fn must return the batch's number of examples (a positive int), got {n!r}")
        return n
    rows = first_tensor_rows(batch)
    if rows is None:
        raise ConfigError(
            f"cannot count the examples of a batch of type {type(batch).__name__}: it holds no tensor; pass "
            "batch_size_fn=lambda batch: <number of examples> to the callback"
        )
    return rows
