"""Driving the batch from a framework callback: which controllers a callback can drive, and how it feeds one.

A callback is given an ``ns.BatchSizeController`` built with ``optimizer="later"``: the framework creates the
optimizer only when training starts, and the callback attaches it then, so the controller's own step hooks apply
the learning-rate multiplier around every ``optimizer.step()`` exactly as in a plain loop.  Its decisions and
metrics go to the monitor (and so to the run store and every sink) unless it was built with a ``run=`` of its own.

A decision whose accumulation the framework cannot take at this step is not taken: the callback gives the
controller a ``Deferred`` measurement instead, which every policy holds on (like a skipped measurement), and the
controller decides again from the next step's measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from noisescale.controllers.controller import BatchSizeController
from noisescale.errors import ConfigError
from noisescale.monitor import GNSMonitor

__all__ = ["Deferred", "MonitorRun", "check_controller", "fixed_batch", "innermost_optimizer"]


def check_controller(controller: object, what: str) -> BatchSizeController:
    """``controller`` if a callback can drive it, else a ``ConfigError`` naming the fix.

    Args:
        controller: what was passed as ``controller=``.
        what: the callback, for the messages.
    """
    if not isinstance(controller, BatchSizeController):
        raise ConfigError(f"{what}(controller=...) takes an ns.BatchSizeController, got {type(controller).__name__}")
    if controller.base_lr is not None or controller.optimizer is not None:
        raise ConfigError(
            f"{what} attaches the trainer's optimizer to the controller when training starts: build the controller "
            "with optimizer='later' (not optimizer=... or base_lr=...)"
        )
    if controller.sampler is not None:
        raise ConfigError(
            f"{what} drives the batch through gradient accumulation of a fixed micro-batch, not a sampler: build the "
            "controller with micro_batch=<examples per backward pass on one rank> and no sampler="
        )
    if controller.config.stall is not None:
        raise ConfigError(
            f"{what} cannot drive a stall response: it reads each step's loss before the optimizer step, which the "
            "trainer does not show its callbacks at that point. Build the controller without stall=, or drive it "
            "from a plain loop"
        )
    if controller.state.step > 0:
        raise ConfigError(
            f"this controller has already taken {controller.state.step} steps: give {what} a new one (its state "
            "is restored from the trainer's checkpoint when training resumes)"
        )
    return controller


def fixed_batch(controller: BatchSizeController) -> bool:
    """Whether the controller can never change the batch (only the learning rate)."""
    grid = controller.config.grid
    return grid.low == grid.high or controller.config.policy == "constant"


def innermost_optimizer(optimizer: Any, needed_by: str = "the controller scales") -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside framework wrappers (Accelerate's ``AcceleratedOptimizer``, ...).

    Raises:
        ConfigError: no torch optimizer found.
    """
    seen = optimizer
    for _ in range(8):
        inner = getattr(seen, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        seen = inner
    if not isinstance(seen, torch.optim.Optimizer):
        raise ConfigError(f"{needed_by} a torch.optim.Optimizer, the trainer has {type(optimizer).__name__}")
    return seen


class MonitorRun:
    """The controller's ``run``: its decisions (events) and metrics go through the monitor to every sink."""

    def __init__(self, monitor: GNSMonitor) -> None:
        self.monitor = monitor

    def event(self, kind: str, message: str = "", *, step: int | None = None, data: Any = None) -> None:
        self.monitor.event(kind, message, step=step, data=data)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.monitor.log(metrics, step=step)


class Deferred:
    """A measurement the controller must hold on: its status is ``"deferred"``, with the reason; every other
    attribute (step, examples, the signal and its band) is the measurement's."""

    status = "deferred"

    def __init__(self, m: Any, reason: str) -> None:
        self._m = m
        self.undefined_reason = reason

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)
