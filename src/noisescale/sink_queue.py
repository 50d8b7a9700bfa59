"""``SinkQueue``: delivers measurements, metrics and events to the sinks from one background thread.

The training thread only appends to a queue.  The sink thread reads each measurement from the device once (the
one host synchronisation a measurement ever costs, made here instead of in the training loop), then hands it to
every sink in order.  A sink that raises is reported once with a warning and counted; the others keep receiving.
The thread starts with the first item, so a monitor without sinks runs no thread at all.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from noisescale.errors import ConfigError
from noisescale.events import Event, Metrics
from noisescale.sink import BaseSink, CallbackSink, Sink, is_sink

if TYPE_CHECKING:
    from noisescale.types import Measurement

__all__ = ["SinkQueue", "check_sinks", "monitor_sinks"]

_STOP = object()


class SinkQueue:
    """One background thread feeding a fixed list of sinks.

    Args:
        sinks: the sinks, in delivery order.
        owned: for each sink, whether ``close()`` closes it (the monitor closes the sinks it was given in
            ``sinks=``, not a run passed as ``run=``, which its owner closes).
    """

    def __init__(self, sinks: Sequence[Sink], *, owned: Sequence[bool]) -> None:
        if len(owned) != len(sinks):
            raise ValueError(f"owned has {len(owned)} entries for {len(sinks)} sinks")
        self.sinks = list(sinks)
        self._owned = list(owned)
        self.errors = [0] * len(self.sinks)  # exceptions raised by each sink so far
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self.sinks)

    # -- training thread ---------------------------------------------------------------------------------------

    def put(self, item: Any) -> None:
        """Queue a ``Measurement``, ``Metrics`` or ``Event``; never waits."""
        if not self.sinks or self._closed:
            return
        if self._thread is None:
            self._start()
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is delivered and every sink flushed; ``False`` on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self) -> None:
        """Deliver what is queued, flush every sink, close the owned ones, stop the thread.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        for i, sink in enumerate(self.sinks):  # after the thread: no item can race the closing
            self._call(i, sink.flush)
            if self._owned[i]:
                self._call(i, sink.close)

    # -- sink thread -------------------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="noisescale-sinks", daemon=True)
            self._thread.start()
            atexit.register(self.close)  # a monitor never closed still delivers what it queued

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, tuple) and item[0] == "flush":
                for i, sink in enumerate(self.sinks):
                    self._call(i, sink.flush)
                item[1].set()
                continue
            self._deliver(item)

    def _deliver(self, item: Any) -> None:
        if isinstance(item, Event):
            for i, sink in enumerate(self.sinks):
                self._call(i, sink.on_event, item)
            return
        if isinstance(item, Metrics):
            method = "on_metrics"
            item = dataclasses.replace(item, values={k: _plain(v) for k, v in item.values.items()})
        else:
            method = "on_measurement"
            try:
                item.status  # noqa: B018 - reads the measurement from the device, once, for every sink
            except Exception as e:  # pragma: no cover - a broken measurement must not stop the thread
                warnings.warn(
                    f"noisescale: could not read a measurement for the sinks: {e!r}", RuntimeWarning, stacklevel=1
                )
                return
        for i, sink in enumerate(self.sinks):
            events = self._call(i, getattr(sink, method), item)
            if events:
                self._broadcast(events, source=i)
        companion = getattr(item, "companion_metrics", None)
        try:
            values = companion() if method == "on_measurement" and companion is not None else None
        except Exception as e:  # pragma: no cover - a broken measurement must not stop the thread
            warnings.warn(f"noisescale: could not read b_precond for the sinks: {e!r}", RuntimeWarning, stacklevel=1)
            values = None
        if values:  # reported beside the measurement (b_precond): metrics of the same step, for every sink
            self._deliver(Metrics(step=item.step, examples=item.examples, wall_time=item.wall_time, values=values))

    def _broadcast(self, events: Iterable[Event], *, source: int) -> None:
        for event in events:
            for j, other in enumerate(self.sinks):
                if j != source:
                    self._call(j, other.on_event, event)

    def _call(self, i: int, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            self.errors[i] += 1
            if self.errors[i] == 1:
                warnings.warn(
                    f"noisescale: the sink {self.sinks[i]!r} raised {e!r} in {getattr(fn, '__name__', fn)}; it keeps "
                    "receiving, and further errors of this sink are counted silently (SinkQueue.errors)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None


def _plain(value: Any) -> float | None:
    """A logged value as a float (a one-element tensor is read here, off the training thread); NaN as ``None``."""
    if value is None:
        return None
    v = float(value.item()) if hasattr(value, "item") else float(value)
    return None if math.isnan(v) else v


class _LogMeasurementSink(BaseSink):
    """An object with only ``log_measurement(measurement)`` (``run=`` before the sink seam), as a sink."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def on_measurement(self, measurement: Measurement) -> None:
        self.run.log_measurement(measurement)

    def __repr__(self) -> str:
        return repr(self.run)


def check_sinks(sinks: object, callbacks: Sequence[object]) -> None:
    """Raise ``ConfigError`` unless ``sinks`` is a list of sinks and every callback is callable."""
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence):
        raise ConfigError(f"sinks must be a list of sinks, e.g. sinks=[run], got {type(sinks).__name__}")
    for s in sinks:
        if not is_sink(s):
            raise ConfigError(
                f"{type(s).__name__} is not a sink: a sink needs on_measurement, on_metrics, on_event, flush and "
                "close methods (subclass noisescale.sink.BaseSink and override what you need)"
            )
    for cb in callbacks:
        if not callable(cb):
            raise ConfigError(f"callbacks must be functions of a Measurement, got {type(cb).__name__}")


def monitor_sinks(sinks: Sequence[Sink], callbacks: Sequence[Callable[[Measurement], object]], run: Any) -> SinkQueue:
    """A monitor's sinks, checked, in one queue.

    ``sinks=`` are closed with the monitor, then come ``callbacks=``, then ``run=``, which its owner closes.
    """
    check_sinks(sinks, callbacks)
    all_sinks: list[Sink] = [*sinks, *(CallbackSink(cb) for cb in callbacks)]
    owned = [True] * len(all_sinks)
    if run is not None:
        if is_sink(run):
            all_sinks.append(run)
        elif callable(getattr(run, "log_measurement", None)):
            all_sinks.append(_LogMeasurementSink(run))
        else:
            raise ConfigError(
                f"run must be a run store (ns.Run), a sink, or have a log_measurement(measurement) method, got "
                f"{type(run).__name__}"
            )
        owned.append(False)
    return SinkQueue(all_sinks, owned=owned)
