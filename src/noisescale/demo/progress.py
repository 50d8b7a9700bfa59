"""Progress of the demo with no dependency: a one-line bar on stderr, redrawn in place on a terminal, or one plain
line per tenth of the run where there is no terminal to redraw on (a pipe, a log file, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["CheckpointLines", "ProgressBar"]


class ProgressBar:
    """Redraws ``step/total [####    ] loss ... B_simple ...`` at most every ``interval`` seconds.

    Disabled (draws nothing) when ``enabled`` is false or the stream is not a terminal, so logs and pipes get
    no carriage-return noise.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True, interval: float = 0.1):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and is_terminal(self.stream)
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
        line = f"\r{step:>{len(str(self.total))}}/{self.total} [{bar:<24}]" + _values(loss, b_simple, band, rate)
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write(line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


class CheckpointLines:
    """One line per tenth of the run, ``step 80/800  loss 0.412  B_simple 54 [41, 77]  61 steps/s``, each flushed
    as it is written, so a pipe or a log file shows progress while the demo trains instead of all at its end.

    Disabled (writes nothing) when ``enabled`` is false.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True, lines: int = 10):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.marks = {max(1, round(total * i / lines)) for i in range(1, lines + 1)}
        self._start = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether ``update`` would write a line for ``step`` (lets the caller skip reading values)."""
        return self.enabled and step in self.marks

    def header(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def update(
        self, step: int, *, loss: float | None, b_simple: float | None, band: tuple[float, float] | None
    ) -> None:
        if not self.due(step):
            return
        rate = step / max(1e-9, time.monotonic() - self._start)
        self.stream.write(
            f"step {step:>{len(str(self.total))}}/{self.total} " + _values(loss, b_simple, band, rate) + "\n"
        )
        self.stream.flush()


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _values(loss: float | None, b_simple: float | None, band: tuple[float, float] | None, rate: float) -> str:
    parts = [f" loss {loss:.3f}" if loss is not None else " loss -"]
    if b_simple is None:
        parts.append("  B_simple -")
    else:
        parts.append(f"  B_simple {b_simple:,.0f}")
        if band is not None:
            parts.append(f" [{_fmt(band[0])}, {_fmt(band[1])}]")
    parts.append(f"  {rate:.0f} steps/s")
    return "".join(parts)


def _fmt(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:,.0f}"
