"""A one-line progress bar on stderr, with no dependency: step, loss and B_simple, redrawn in place."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Redraws ``step/total [####    ] loss ... B_simple ...`` at most every ``interval`` seconds.

    Disabled (draws nothing) when ``enabled`` is false or the stream is not a terminal, so logs and pipes get
    no carriage-return noise.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True, interval: float = 0.1):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.interval = interval
        self._last = 0.0
        self._start = time.monotonic()
        self._width = 0

    def due(self, step: int) -> bool:
        """Whether ``update`` would draw now (lets the caller skip reading values, i.e. device syncs)."""
        return self.enabled and (step >= self.total or time.monotonic() - self._last >= self.interval)

    def update(
        self, step: int, *, loss: float | None, b_simple: float | None, band: tuple[float, float] | None
    ) -> None:
        if not self.due(step):
            return
        self._last = time.monotonic()
        frac = min(1.0, step / self.total) if self.total else 1.0
        bar = "#" * int(frac * 24)
        rate = step / max(1e-9, self._last - self._start)
        parts = [f"\r{step:>{len(str(self.total))}}/{self.total} [{bar:<24}]"]
        parts.append(f" loss {loss:.3f}" if loss is not None else " loss -")
        if b_simple is None:
            parts.append("  B_simple -")
        else:
            parts.append(f"  B_simple {b_simple:,.0f}")
            if band is not None:
                parts.append(f" [{_fmt(band[0])}, {_fmt(band[1])}]")
        parts.append(f"  {rate:.0f} steps/s")
        line = "".join(parts)
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write(line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _fmt(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:,.0f}"
