"""What flows to the sinks besides measurements: events (an alert, a controller decision) and the user's metrics.

Both are plain frozen records built on the training thread and delivered by the monitor's sink queue, so a sink
never needs to know where they came from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from noisescale.errors import ConfigError

__all__ = ["Event", "Metrics", "metric_values"]


@dataclass(frozen=True)
class Event:
    """Something that happened during training, worth recording beside the measurements.

    Attributes:
        kind: what it is, e.g. ``"alert"``, ``"controller"``, ``"cadence"``, ``"note"``.
        message: one sentence a person can read.
        step: the optimizer step it belongs to (the monitor's numbering, from 1), if any.
        examples: examples seen at that step, if known.
        wall_time: Unix time it happened.
        data: JSON-ready details (values a sink stores as they are, e.g. ``{"before": 64, "after": 128}``).
    """

    kind: str
    message: str = ""
    step: int | None = None
    examples: int | None = None
    wall_time: float = field(default_factory=time.time)
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Metrics:
    """Numbers the user logged for one step (``monitor.log({"loss": loss})``), as plain floats.

    Attributes:
        step: the optimizer step they belong to (the monitor's numbering, from 1).
        examples: examples seen at that step, if known.
        wall_time: Unix time they were logged.
        values: name -> value (``None`` for a missing or NaN value).
    """

    step: int
    examples: int | None
    wall_time: float
    values: Mapping[str, float | None]


def metric_values(metrics: Mapping[str, object]) -> dict[str, object]:
    """``metrics`` checked: names non-empty strings, values numbers, ``None`` or one-element tensors.

    A tensor is detached and copied now (asynchronously: no host synchronisation), so a later in-place change by the
    caller (an accumulator's ``zero_()``) cannot alter what is recorded; it is read where the value is written.

    Raises:
        ConfigError: for anything else, naming the metric.
    """
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a mapping like {{'loss': 0.3}}, got {type(metrics).__name__}")
    out: dict[str, object] = {}
    for key, raw in metrics.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"metric names must be non-empty strings, got {key!r}")
        value: Any = raw
        if callable(getattr(value, "detach", None)) and callable(getattr(value, "numel", None)):  # a tensor
            if value.numel() != 1:
                raise ConfigError(
                    f"metric {key!r} must be a number or a one-element tensor, got shape {tuple(value.shape)}"
                )
            value = value.detach().clone()
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"metric {key!r} must be a number or a one-element tensor, got {value!r}")
        out[key] = value
    return out
