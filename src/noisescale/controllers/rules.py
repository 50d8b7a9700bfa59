"""How the learning rate, momentum and weight decay follow the batch size: pure functions of plain numbers.

``lr_scale`` multiplies the learning rate the user scheduled for ``base_batch``:

- ``"none"``: 1.
- ``"linear"``: ``B / B0`` (Goyal et al. 2017, SGD).
- ``"sqrt"``: ``sqrt(B / B0)`` (Adam-type optimizers; Malladi et al. 2022).
- ``"adascale"``: the AdaScale gain ``r = (1 + B_simple / B0) / (1 + B_simple / B)`` (Johnson et al. 2020): the
  linear rule's ``B / B0`` while the gradient is mostly noise (``B_simple >> B``), falling to 1 as the noise
  becomes negligible (``B_simple << B0``), where a larger batch no longer buys a larger step.

Horizons (``keep_horizons``) keep a timescale fixed in examples rather than in optimizer steps when the batch
is ``B`` instead of ``B0``: an exponential average with factor ``beta`` per step of ``B0`` examples forgets at
``beta ** (B / B0)`` per step of ``B`` examples; decoupled weight decay shrinks the weights by ``lr * wd`` per
step, i.e. by ``lr * wd / B`` per example, which stays put with ``wd' = wd * (B / B0) / lr_scale``.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["HORIZONS", "LR_RULES", "Horizon", "LrRule", "horizon_beta", "lr_scale", "weight_decay_for"]

LrRule = Literal["none", "linear", "sqrt", "adascale"]
LR_RULES: tuple[LrRule, ...] = ("none", "linear", "sqrt", "adascale")
Horizon = Literal["momentum", "beta2", "weight_decay"]
HORIZONS: tuple[Horizon, ...] = ("momentum", "beta2", "weight_decay")


def lr_scale(rule: LrRule, batch: int, base_batch: int, b_simple: float | None = None) -> float:
    """The learning-rate multiplier for a step of ``batch`` examples (see the module docstring).

    ``adascale`` without a measured ``b_simple`` gives 1 (no gain is claimed without a measurement); an infinite
    ``b_simple`` is pure noise (gain ``B / B0``), ``b_simple = 0`` no noise (gain 1).

    >>> lr_scale("linear", 256, 32), lr_scale("sqrt", 128, 32), round(lr_scale("adascale", 64, 32, 32.0), 4)
    (8.0, 2.0, 1.3333)
    """
    ratio = batch / base_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "adascale":
        if b_simple is None or math.isnan(b_simple):
            return 1.0
        if math.isinf(b_simple):
            return ratio
        b = max(0.0, b_simple)
        return (1.0 + b / base_batch) / (1.0 + b / batch)
    raise ValueError(f"unknown lr_rule {rule!r}")


def horizon_beta(beta: float, ratio: float) -> float:
    """An averaging factor per step of ``ratio x B0`` examples that keeps the horizon of ``beta`` per ``B0``.

    >>> round(horizon_beta(0.9, 2.0), 6)
    0.81
    """
    if beta <= 0.0:
        return beta
    return beta**ratio


def weight_decay_for(weight_decay: float, ratio: float, lr_scale: float) -> float:
    """Weight decay for a batch ``ratio x B0`` and a learning rate ``lr_scale`` times the scheduled one, with the
    decay per example unchanged.

    >>> weight_decay_for(0.1, 4.0, 4.0), weight_decay_for(0.1, 4.0, 2.0)
    (0.1, 0.2)
    """
    return weight_decay * ratio / lr_scale if lr_scale > 0 else weight_decay
