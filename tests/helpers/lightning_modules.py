"""The LightningModule of the Lightning tests (imports lightning: only for tests that have it)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import nn


class Regression(L.LightningModule):
    """Mean squared error of ``net(x)`` against ``y``, plain SGD."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
