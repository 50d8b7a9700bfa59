"""What the example collector tells an observer from its backward hooks: the seam per-group statistics plug into.

``ExampleCollector.observer`` holds at most one; ``collectors.groups.GroupObserver`` is the one noisescale has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from noisescale.collectors.rules.registry import NormRule

__all__ = ["ExampleObserver"]


class ExampleObserver(Protocol):
    """What the example collector tells an observer, from its backward hooks (``ExampleCollector.observer``)."""

    def on_layer(
        self,
        module: nn.Module,
        rule: NormRule,
        inputs: tuple[object, ...],
        grad_output: torch.Tensor,
        slots: Mapping[str, int],
    ) -> Mapping[str, torch.Tensor] | None:
        """A layer's output gradient arrived (``inputs`` and ``grad_output`` laid out batch-first; ``slots`` are its
        measured parameters): return its per-example squared norms, to be used instead of ``rule``'s, or ``None``
        to let the rule run."""
        ...

    def on_norms(self, sq: torch.Tensor) -> None:
        """Per-example squared norms ``(b,)`` of one measured parameter (or one part of a tied one) were recorded."""
        ...
