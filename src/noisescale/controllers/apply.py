"""Applying decisions to the user's objects: the one place that changes an optimizer, a sampler or a clock.

The learning rate is multiplied only for the duration of ``optimizer.step()`` (a step pre-hook sets it, a post-hook
puts the user's value back), so whatever the user or a ``torch.optim.lr_scheduler`` writes into
``param_groups[i]["lr"]`` stays theirs: the controller composes with any scheduler, and a saved
``optimizer.state_dict()`` holds the unscaled values.  Momentum, Adam's betas and weight decay are adjusted the
same way when asked to keep their horizons in examples.  Optimizer state is never touched.

An optimizer may run the closure that computes the gradient inside its own ``step(closure)`` (Lightning does): the
step's pre-hook then runs before the gradient exists, so before the decision about it.  The optimizer reads the
learning rate only after the closure, so a ``set()`` made while a step runs is applied to that step at once, and the
learning rate a step used is reported when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import noisescale.optimizer_overrides as optimizer_overrides
from noisescale.controllers.rules import HORIZONS, Horizon, horizon_beta, weight_decay_for
from noisescale.errors import ConfigError

__all__ = ["OptimizerScaling", "check_horizon_names", "check_horizons"]


def check_horizon_names(keep: Sequence[str]) -> tuple[Horizon, ...]:
    """The valid, de-duplicated ``keep_horizons``, before there is an optimizer to check them against."""
    out: list[Horizon] = []
    for h in keep:
        if h not in HORIZONS:
            raise ConfigError(f"unknown horizon {h!r} in keep_horizons; expected some of {list(HORIZONS)}")
        if h not in out:
            out.append(h)
    return tuple(out)


def check_horizons(optimizer: Any, keep: Sequence[str]) -> tuple[Horizon, ...]:
    """The valid, de-duplicated ``keep_horizons``; each must find something to keep in ``optimizer``."""
    out: list[Horizon] = []
    for h in keep:
        if h not in HORIZONS:
            raise ConfigError(f"unknown horizon {h!r} in keep_horizons; expected some of {list(HORIZONS)}")
        if optimizer is None:
            raise ConfigError(f"keep_horizons={list(keep)} adjusts an optimizer: pass optimizer=your_optimizer")
        groups = optimizer.param_groups
        found = {
            "momentum": any(g.get("momentum") or g.get("betas") for g in groups),
            "beta2": any(g.get("betas") for g in groups),
            "weight_decay": any(g.get("weight_decay") for g in groups),
        }[h]
        if not found:
            raise ConfigError(
                f"keep_horizons has {h!r}, but no parameter group of {type(optimizer).__name__} has "
                + {"momentum": "momentum or betas", "beta2": "betas", "weight_decay": "weight_decay > 0"}[h]
                + f"; drop {h!r}"
            )
        if h not in out:
            out.append(h)
    return tuple(out)


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _betas(group: Any) -> tuple[float, float] | None:
    """A parameter group's ``(beta1, beta2)`` when they are plain numbers (not tensors), else ``None``."""
    betas = group.get("betas")
    if isinstance(betas, tuple) and len(betas) == 2 and all(_real(b) for b in betas):
        return betas
    return None


def _decays(group: Any) -> bool:
    """Whether a parameter group has a plain, positive weight decay."""
    return _real(group.get("weight_decay")) and group["weight_decay"] > 0


class OptimizerScaling:
    """Step hooks on one optimizer that apply ``lr_scale`` (and the horizons) for the length of each step.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        keep: horizons to keep constant in examples (see ``noisescale.controllers.rules``).
        on_lr: called with the first parameter group's learning rate as used by each step, when the step ends.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        keep: Sequence[Horizon] = (),
        on_lr: Callable[[float], None] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for i, g in enumerate(optimizer.param_groups):
            if "lr" not in g:
                raise ConfigError(f"param group {i} of {type(optimizer).__name__} has no 'lr' to scale")
        self.optimizer = optimizer
        self.keep = tuple(keep)
        self.on_lr = on_lr
        self.lr_scale = 1.0
        self.ratio = 1.0
        self.next_ratio = 1.0  # B / B0 of the step after the one ``ratio`` is for (the batch being trained now)
        self._saved: list[dict[str, Any]] | None = None
        self._running = False  # between a step's pre-hook and its post-hook
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]
        if "beta2" in self.keep or "weight_decay" in self.keep:
            # Adam's preconditioned noise scale reads beta2 and the decay before the step that changes them.
            optimizer_overrides.declare(optimizer, self._next_values)

    def set(self, lr_scale: float, ratio: float, next_ratio: float | None = None) -> None:
        """Use ``lr_scale`` and the batch ratio ``B / B0`` from the next ``optimizer.step()`` on, or from now on
        when called while a step runs (inside the closure of ``optimizer.step(closure)``); ``next_ratio``: the
        ratio of the batch after it (``ratio`` when ``None``), what the following step will most likely use."""
        self.lr_scale, self.ratio = float(lr_scale), float(ratio)
        self.next_ratio = self.ratio if next_ratio is None else float(next_ratio)
        if self._saved is not None and self._running:
            self._restore()
            self._scale(self.optimizer)

    def _next_values(self, group: Any) -> dict[str, Any]:
        """What the step after the current decision will use in ``group`` (``optimizer_overrides``).

        Between a step's decision and its ``optimizer.step()``, the gradient being accumulated is the next batch's,
        whose ratio is ``next_ratio``.  The decay also depends on that step's learning-rate multiplier, decided
        only after the gradient is measured.
        """
        out: dict[str, Any] = {}
        betas = _betas(group)
        if "beta2" in self.keep and betas is not None:
            out["betas"] = (betas[0], horizon_beta(betas[1], self.next_ratio))
        if "weight_decay" in self.keep and _decays(group):
            out["weight_decay"] = optimizer_overrides.UNKNOWN
        return out

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore()  # a step that raised last time left its values in place
        self._scale(optimizer)
        self._running = True

    def _scale(self, optimizer: Any) -> None:
        saved = []
        for g in optimizer.param_groups:
            keep: dict[str, Any] = {"lr": g["lr"]}
            g["lr"] = g["lr"] * self.lr_scale  # a tensor lr becomes a new tensor; the user's comes back after the step
            if "momentum" in self.keep and _real(g.get("momentum")) and g["momentum"] > 0:
                keep["momentum"] = g["momentum"]
                g["momentum"] = horizon_beta(g["momentum"], self.ratio)
            betas = _betas(g)
            if betas is not None:
                b1, b2 = betas
                if "momentum" in self.keep:
                    b1 = horizon_beta(b1, self.ratio)
                if "beta2" in self.keep:
                    b2 = horizon_beta(b2, self.ratio)
                if (b1, b2) != betas:
                    keep["betas"] = betas
                    g["betas"] = (b1, b2)
            if "weight_decay" in self.keep and _decays(g):
                keep["weight_decay"] = g["weight_decay"]
                g["weight_decay"] = weight_decay_for(g["weight_decay"], self.ratio, self.lr_scale)
            saved.append(keep)
        self._saved = saved

    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._running = False
        if self.on_lr is not None and optimizer.param_groups:
            self.on_lr(float(optimizer.param_groups[0]["lr"]))
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            return
        for g, keep in zip(self.optimizer.param_groups, self._saved, strict=True):
            g.update(keep)
        self._saved = None

    def close(self) -> None:
        """Remove the hooks (and put back any value a raising step left)."""
        self._running = False
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles = []
        optimizer_overrides.withdraw(self.optimizer, self._next_values)
