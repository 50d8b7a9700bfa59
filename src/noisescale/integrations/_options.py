"""The monitor's options as a callback takes them: checked when the callback is built, used when training starts.

A framework callback is built before the model is wrapped for training (DDP, FSDP2) and before the process group
exists, so the ``GNSMonitor`` itself can only be created when training starts.  Bad options still fail at the
callback's construction: ``check()`` builds a probe monitor on a one-parameter model with the same options, so the
messages are the monitor's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from noisescale.errors import ConfigError
from noisescale.integrations._driving import innermost_optimizer
from noisescale.monitor import GNSMonitor
from noisescale.sink import Sink
from noisescale.sink_queue import check_sinks
from noisescale.source_choice import SOURCES, Source
from noisescale.types import Measurement

__all__ = ["MonitorOptions"]


@dataclass(frozen=True)
class MonitorOptions:
    """Everything a callback passes on to ``GNSMonitor`` (see its docstring for each option)."""

    source: Source = "auto"
    per_layer: bool = True
    halflife: float | None = None
    confidence: float = 0.9
    on_unsupported: Any = None
    scope: Any = "all"
    loss_couples_examples: bool = False
    sinks: Sequence[Sink] = ()
    callbacks: Sequence[Callable[[Measurement], object]] = field(default=())
    precondition: bool = False  # measure Adam's preconditioned noise scale, with the framework's optimizer

    def check(self) -> None:
        """Raise the monitor's own ``ConfigError`` for a bad option, before any training.

        Raises:
            ConfigError: an unknown source, an out-of-range option, or something that is not a sink or callable.
        """
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        check_sinks(self.sinks, self.callbacks)
        # The rank source needs a DDP model, which does not exist yet: the probe checks the other options.
        probe_source: Source = "auto" if self.source == "rank" else self.source
        probe_model = nn.Linear(1, 1)
        probe = GNSMonitor(
            probe_model,
            source=probe_source,
            per_layer=self.per_layer,
            halflife=self.halflife,
            confidence=self.confidence,
            on_unsupported=self.on_unsupported,
            scope=self.scope,
            loss_couples_examples=self.loss_couples_examples,
            precondition=torch.optim.Adam(probe_model.parameters()) if self.precondition else None,
        )
        probe.close()

    def build(
        self, model: nn.Module, *, run: Any = None, scaler: Any = None, optimizer: Any = None, **overrides: Any
    ) -> GNSMonitor:
        """The monitor for ``model`` (the model as the framework trains it: wrapped in DDP, sharded).

        Args:
            model: the model.
            run: a run store for ``GNSMonitor(run=)`` (left open when the monitor closes).
            scaler: the framework's ``GradScaler``, if it scales the loss.
            optimizer: the framework's optimizer (possibly wrapped), for ``precondition``.
            overrides: options that replace this object's (``source``, ``loss_couples_examples``).
        """
        kwargs: dict[str, Any] = {
            "source": self.source,
            "per_layer": self.per_layer,
            "halflife": self.halflife,
            "confidence": self.confidence,
            "on_unsupported": self.on_unsupported,
            "scope": self.scope,
            "loss_couples_examples": self.loss_couples_examples,
            "sinks": list(self.sinks),
            "callbacks": list(self.callbacks),
            "run": run,
            "scaler": scaler,
        }
        if self.precondition:
            if optimizer is None:
                raise ConfigError("precondition=True reads the trainer's optimizer, and the trainer passed none")
            kwargs["precondition"] = innermost_optimizer(optimizer, "precondition=True reads")
        kwargs.update(overrides)
        return GNSMonitor(model, **kwargs)
