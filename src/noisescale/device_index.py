"""``DeviceIndex``: an integer index tensor kept on a device, rebuilt only when its content changes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DeviceIndex"]


class DeviceIndex:
    """An integer index tensor kept on a device, rebuilt only when its content changes.

    Hooks fire in the same order every step, so a collector's slot layout repeats from step to step: building the
    index once spares an accelerator a blocking host-to-device copy per step.  One layout is remembered.
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[int, ...], tuple[int, ...] | None, torch.device] | None = None
        self._index: torch.Tensor | None = None

    def get(self, slots: Sequence[int], device: torch.device, repeats: Sequence[int] | None = None) -> torch.Tensor:
        """``slots`` as a long tensor on ``device``, each entry repeated ``repeats[i]`` times if given."""
        key = (tuple(slots), None if repeats is None else tuple(repeats), device)
        if self._index is None or key != self._key:
            index = torch.tensor(key[0], dtype=torch.long)
            if key[1] is not None:
                index = torch.repeat_interleave(index, torch.tensor(key[1], dtype=torch.long))
            self._key, self._index = key, index.to(device)
        return self._index
