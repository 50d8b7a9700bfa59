"""What a demo task provides to the training loop: a model, an optimizer, batches, a loss and a final check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from noisescale.errors import NoiseScaleError

__all__ = ["DemoError", "Task"]


class DemoError(NoiseScaleError):
    """A demo cannot run here (a missing optional package, no corpus); the message says what to do."""


@dataclass
class Task:
    """One demo problem.

    Attributes:
        name: ``"digits"`` or ``"charlm"``.
        title: a short description for the closing table.
        model, optimizer: what is trained.
        batch: ``batch(batch_size) -> (inputs, targets)``, the next training batch (seeded, shuffled epochs).
        loss: ``loss(model_output, targets) -> mean loss over the batch``.
        evaluate: held-out numbers at the end, e.g. ``{"test_accuracy": 0.95}``.
        on_unsupported: the monitor's policy for layers without a per-example rule.
        config: settings recorded in the run.
        threads: CPU threads for torch while the task trains (``None``: leave as is).  A model this small runs
            fastest on one thread, and far faster than on several when other processes share the cores.
        batch_ids: the training-set indices of the last batch ``batch`` returned, if the task tells them.
        flipped: the indices of training labels flipped on purpose (``--noisy-labels``), if any.
    """

    name: str
    title: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[], dict[str, float]]
    on_unsupported: str = "error"
    config: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    batch_ids: Callable[[], torch.Tensor] | None = None
    flipped: list[int] | None = None


class EpochSampler:
    """Indices of shuffled epochs over ``n`` examples, batch by batch (a batch never straddles two epochs)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self._order = torch.randperm(n, generator=generator)
        self._pos = 0

    def next(self, batch_size: int) -> torch.Tensor:
        if batch_size > self.n:
            raise DemoError(f"--batch-size {batch_size} is larger than the {self.n} training examples")
        if self._pos + batch_size > self.n:
            self._order = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + batch_size]
        self._pos += batch_size
        return idx
