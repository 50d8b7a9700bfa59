"""The sink seam: one interface for everything that receives measurements, metrics and events.

A run store, a TensorBoard writer, an alert engine and a framework's logger all need the same three feeds. The
monitor hands them to every sink from one background thread (``noisescale.sink_queue``), after the measurement
has been read from the device once, so no sink ever makes the training step wait or synchronise the device::

    monitor = ns.GNSMonitor(model, sinks=[run, ns.sinks.TensorBoard("tb/")])
    ...
    m = monitor.step(batch_size=B)        # queued for the sinks; returns at once
    monitor.log({"loss": loss})           # the user's numbers, to every sink
    monitor.close()                       # delivers what is queued, then flushes and closes the sinks

A sink is any object with these five methods (``BaseSink`` gives do-nothing defaults).  ``on_measurement`` and
``on_metrics`` may return events (an alert rule that fired); the queue delivers them to every other sink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from noisescale.events import Event, Metrics

if TYPE_CHECKING:
    from noisescale.types import Measurement

__all__ = ["BaseSink", "CallbackSink", "Sink", "is_sink"]


@runtime_checkable
class Sink(Protocol):
    """Receives what the monitor measures and what the user logs, on the monitor's sink thread."""

    def on_measurement(self, measurement: Measurement) -> Iterable[Event] | None:
        """One step's measurement, already read from the device (reading its numbers costs nothing more)."""
        ...

    def on_metrics(self, metrics: Metrics) -> Iterable[Event] | None:
        """The user's numbers for a step (``GNSMonitor.log``)."""
        ...

    def on_event(self, event: Event) -> None:
        """An event from the user, a controller, or another sink."""
        ...

    def flush(self) -> object:
        """Make everything received so far durable or visible (called on ``GNSMonitor.flush`` and at close)."""
        ...

    def close(self) -> object:
        """Release what the sink holds; called once, after the last item."""
        ...


class BaseSink:
    """A sink that ignores everything: subclass it and override only what you need."""

    def on_measurement(self, measurement: Measurement) -> Iterable[Event] | None:
        return None

    def on_metrics(self, metrics: Metrics) -> Iterable[Event] | None:
        return None

    def on_event(self, event: Event) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class CallbackSink(BaseSink):
    """Calls ``fn(measurement)`` for every measurement, on the sink thread (``GNSMonitor(callbacks=[fn])``)."""

    def __init__(self, fn: Callable[[Measurement], object]) -> None:
        if not callable(fn):
            raise TypeError(f"a callback must be callable, got {type(fn).__name__}")
        self.fn = fn

    def on_measurement(self, measurement: Measurement) -> Iterable[Event] | None:
        self.fn(measurement)
        return None

    def __repr__(self) -> str:
        return f"CallbackSink({getattr(self.fn, '__qualname__', self.fn)!r})"


_METHODS = ("on_measurement", "on_metrics", "on_event", "flush", "close")


def is_sink(obj: object) -> bool:
    """Whether ``obj`` has the five methods of a ``Sink``."""
    return all(callable(getattr(obj, name, None)) for name in _METHODS)
