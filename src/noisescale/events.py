"""What flows to the sinks besides measurements: events (an alert, a controller decision) and the user's metrics.

Both are plain frozen records built on the training thread and delivered by the monitor's sink queue, so a sink
never needs to know where they came from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Metrics"]


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
