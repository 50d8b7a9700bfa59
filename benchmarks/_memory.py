"""Peak bytes of live tensor storage during some steps: exact, unlike RSS, which the C allocator blurs.

A dispatch mode sees every tensor an operator returns, forward and backward alike; it remembers each storage
by a weak reference and its size, and drops it once the storage has been freed.  Slow (Python per operator), so
it is only for the memory probe, never for timing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: ...`` then ``m.peak``: the most bytes of storage alive at once.

    Storages made before the mode started (parameters, inputs, optimizer state) and the results of in-place
    operators are not counted: ``peak`` is what the steps inside allocate on top of what exists.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._forget_freed()
        if func._schema.is_mutable:  # in-place and out= results alias storage that already exists
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _forget_freed(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
