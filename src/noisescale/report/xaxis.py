"""What the report's charts are drawn against: examples seen (the default), optimizer steps, or wall time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from noisescale.errors import ConfigError

__all__ = ["X_AXES", "XAxis", "XScale", "x_scale"]

XAxis = Literal["examples", "steps", "time"]
X_AXES: tuple[XAxis, ...] = ("examples", "steps", "time")


@dataclass(frozen=True)
class XScale:
    """One choice of x axis: its label, and how a row's ``step``, ``examples`` and ``wall_time`` map onto it.

    Wall time is counted from the run's start, in the unit that suits the run's length (s, min or h).
    """

    kind: XAxis
    label: str
    start: float = 0.0
    seconds_per_unit: float = 1.0
    unit: str = ""

    def of(self, step: int | None, examples: int | None, wall_time: float | None) -> float | None:
        """The x of one row (``None`` where that row lacks it, e.g. a metric logged with no examples count)."""
        if self.kind == "examples":
            return None if examples is None else float(examples)
        if self.kind == "steps":
            return None if step is None else float(step)
        return None if wall_time is None else (wall_time - self.start) / self.seconds_per_unit

    def format(self, x: float) -> str:
        """An x value for hover text: ``12,800`` examples, step ``100``, ``2.5 min``."""
        if self.kind == "time":
            return f"{x:.3g} {self.unit}"
        return f"{x:,.0f}"


def x_scale(kind: XAxis, *, start: float = 0.0, duration: float = 0.0) -> XScale:
    """The scale for ``kind``; ``start`` and ``duration`` (seconds) of the run set the wall-time unit."""
    if kind == "examples":
        return XScale("examples", "examples seen")
    if kind == "steps":
        return XScale("steps", "step")
    if kind != "time":
        raise ConfigError(f"x axis must be one of {list(X_AXES)}, got {kind!r}")
    seconds, unit = (1.0, "s") if duration < 120 else (60.0, "min") if duration < 7200 else (3600.0, "h")
    return XScale("time", f"wall time since the start ({unit})", start, seconds, unit)
