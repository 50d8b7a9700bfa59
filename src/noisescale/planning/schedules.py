"""Batch-size schedules the planner can price: fixed, linear ramp, noise-following, devices x micro-batch, replay.

A schedule answers one question: the batch size of the next step, given the steps and examples taken so far and
the noise scale of the current stretch of training.  Batch sizes are continuous (the model is).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from noisescale.errors import ConfigError

__all__ = ["Devices", "Fixed", "FollowNoise", "LinearRamp", "Replay", "Schedule"]


@runtime_checkable
class Schedule(Protocol):
    """What ``noisescale.planning.model.predict`` needs from a schedule.

    Attributes:
        name: a short label for tables and charts.
        kind: ``"fixed"``, ``"ramp"``, ``"follow"``, ``"devices"`` or ``"replay"``.
        stateful: whether the batch depends on the steps or examples already taken (then it is re-read as the
            prediction advances instead of once per stretch).
    """

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def stateful(self) -> bool: ...

    def batch(self, *, steps: float, examples: float, b_noise: float) -> float: ...

    def params(self) -> dict[str, Any]: ...


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Fixed:
    """The same batch size every step."""

    batch_size: float
    kind: str = field(default="fixed", init=False)
    stateful: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        _positive("Fixed: batch_size", self.batch_size)

    @property
    def name(self) -> str:
        return f"batch {self.batch_size:g}"

    def batch(self, *, steps: float, examples: float, b_noise: float) -> float:
        return float(self.batch_size)

    def params(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}


@dataclass(frozen=True)
class LinearRamp:
    """A batch growing linearly with the examples seen, from ``start`` to ``end`` over ``examples``, then flat."""

    start: float
    end: float
    examples: float
    kind: str = field(default="ramp", init=False)
    stateful: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        _positive("LinearRamp: start", self.start)
        _positive("LinearRamp: end", self.end)
        _positive("LinearRamp: examples", self.examples)

    @property
    def name(self) -> str:
        return f"ramp {self.start:g}->{self.end:g} over {self.examples:,.0f} ex"

    def batch(self, *, steps: float, examples: float, b_noise: float) -> float:
        return self.start + (self.end - self.start) * min(1.0, examples / self.examples)

    def params(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "examples": self.examples}


@dataclass(frozen=True)
class FollowNoise:
    """``k x B_noise`` of the current stretch, clipped to ``[min_batch, max_batch]``.

    Unclipped it costs exactly ``S_min (1 + 1/k)`` steps and ``E_min (1 + k)`` examples: ``k = 1`` takes twice the
    minimum of each.
    """

    k: float = 1.0
    min_batch: float = 1.0
    max_batch: float | None = None
    kind: str = field(default="follow", init=False)
    stateful: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        _positive("FollowNoise: k", self.k)
        _positive("FollowNoise: min_batch", self.min_batch)
        if self.max_batch is not None and _positive("FollowNoise: max_batch", self.max_batch) < self.min_batch:
            raise ConfigError(f"FollowNoise: max_batch must be >= min_batch, got {self.max_batch} < {self.min_batch}")

    @property
    def name(self) -> str:
        return f"{self.k:g} x B_simple"

    def batch(self, *, steps: float, examples: float, b_noise: float) -> float:
        b = max(self.min_batch, self.k * b_noise)
        return b if self.max_batch is None else min(self.max_batch, b)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "min_batch": self.min_batch, "max_batch": self.max_batch}


@dataclass(frozen=True)
class Devices:
    """``devices`` data-parallel workers with ``micro_batch`` examples each, ``accumulation`` micro-steps per step."""

    devices: int
    micro_batch: int
    accumulation: int = 1
    kind: str = field(default="devices", init=False)
    stateful: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        for name in ("devices", "micro_batch", "accumulation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Devices: {name} must be a positive integer, got {v!r}")

    @property
    def batch_size(self) -> int:
        return self.devices * self.micro_batch * self.accumulation

    @property
    def name(self) -> str:
        acc = f" x {self.accumulation} acc" if self.accumulation > 1 else ""
        return f"{self.devices} dev x {self.micro_batch}{acc}"

    def batch(self, *, steps: float, examples: float, b_noise: float) -> float:
        return float(self.batch_size)

    def params(self) -> dict[str, Any]:
        return {"devices": self.devices, "micro_batch": self.micro_batch, "accumulation": self.accumulation}


@dataclass(frozen=True)
class Replay:
    """The batch another run used, as a function of the examples seen (a step function).

    Args:
        examples: examples seen at the end of each of that run's steps (increasing).
        batch_sizes: the batch of each of those steps.  Past the last step the last batch continues.
        label: the name shown in tables.
    """

    examples: Sequence[float]
    batch_sizes: Sequence[float]
    label: str = "replay"
    kind: str = field(default="replay", init=False)
    stateful: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if len(self.examples) != len(self.batch_sizes) or not self.examples:
            raise ConfigError(
                f"Replay: examples and batch_sizes must be non-empty and of equal length, got "
                f"{len(self.examples)} and {len(self.batch_sizes)}"
            )
        if any(b2 < b1 for b1, b2 in zip(self.examples, self.examples[1:])):
            raise ConfigError("Replay: examples must be non-decreasing (examples seen at the end of each step)")
        for b in self.batch_sizes:
            _positive("Replay: every batch size", b)
        object.__setattr__(self, "examples", tuple(float(e) for e in self.examples))
        object.__setattr__(self, "batch_sizes", tuple(float(b) for b in self.batch_sizes))

    @property
    def name(self) -> str:
        return self.label

    def batch(self, *, steps: float, examples: float, b_noise: float) -> float:
        # The step that ends at the first recorded count strictly past ``examples`` is the one being taken.
        # (A relative tolerance: summed pieces land on a recorded count only up to rounding.)
        i = bisect.bisect_right(self.examples, examples + 1e-9 * max(1.0, examples))
        return self.batch_sizes[min(i, len(self.batch_sizes) - 1)]

    def params(self) -> dict[str, Any]:
        return {"steps": len(self.examples), "batch_min": min(self.batch_sizes), "batch_max": max(self.batch_sizes)}
