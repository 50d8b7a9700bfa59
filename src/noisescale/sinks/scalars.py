"""``ScalarSink``: what TensorBoard, W&B and MLflow have in common, a stream of ``(tag, value, position)`` writes.

A subclass only says how to write a batch of scalars at one position and how to write an event; this base turns
measurements (``noisescale.sinks.tags``) and the user's metrics into those writes, on the x axis chosen (optimizer
steps or examples seen).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from noisescale.errors import ConfigError
from noisescale.events import Event, Metrics
from noisescale.sink import BaseSink
from noisescale.sinks.tags import LayerKind, measurement_scalars
from noisescale.types import COLUMNS

__all__ = ["Axis", "Layers", "ScalarSink", "is_rank_zero", "require"]

Axis = Literal["step", "examples"]
Layers = Literal["param", "module", "both"] | None


def require(module: str, *, extra: str, what: str, package: str | None = None) -> Any:
    """Import ``module`` or raise an ``ImportError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs {package or module.split('.')[0]}: pip install 'noisescale[{extra}]' ({e})"
        ) from None


def is_rank_zero() -> bool:
    """Whether this process writes: rank 0 of an initialised ``torch.distributed`` job, or any process without one.

    Sinks, like the run store, write on rank 0 only, so the same training script runs on every rank.
    """
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or int(dist.get_rank()) == 0


class ScalarSink(BaseSink):
    """Turns measurements and metrics into scalar writes; subclasses implement ``_write`` and ``_write_event``.

    Args:
        x: the x axis: ``"step"`` (optimizer steps) or ``"examples"`` (examples seen, which stays comparable when
            the batch size changes).
        layers: per-layer values to write: ``"param"`` (each parameter tensor, ``m.layers``), ``"module"``
            (``m.modules``), ``"both"``, or ``None``.
        layer_columns: which columns to write per layer (default B_simple alone; any of ``noisescale.types.COLUMNS``).

    On a data-parallel rank other than 0 the sink is inactive (``active`` is ``False``): it creates nothing and
    writes nothing.
    """

    def __init__(self, *, x: Axis = "step", layers: Layers = "param", layer_columns: Sequence[str] = ("b_simple",)):
        if x not in ("step", "examples"):
            raise ConfigError(f"x must be 'step' or 'examples', got {x!r}")
        if layers not in ("param", "module", "both", None):
            raise ConfigError(f"layers must be 'param', 'module', 'both' or None, got {layers!r}")
        if isinstance(layer_columns, str):
            raise ConfigError(f"layer_columns must be a list of columns, e.g. ['b_simple'], got {layer_columns!r}")
        unknown = [c for c in layer_columns if c not in COLUMNS]
        if unknown:
            raise ConfigError(f"unknown layer columns {unknown}; expected some of {list(COLUMNS)}")
        self.x: Axis = x
        self.layer_kinds: tuple[LayerKind, ...] = (
            () if layers is None else ("param", "module") if layers == "both" else (layers,)
        )
        self.layer_columns = tuple(layer_columns)
        self._last_measured: tuple[int, int] | None = None  # (step, examples) of the latest measurement
        self._warned_axis = False
        self.active = is_rank_zero()

    # -- the sink interface ------------------------------------------------------------------------------------

    def on_measurement(self, measurement: Any) -> None:
        if not self.active:
            return
        d = measurement.to_dict(per_layer=bool(self.layer_kinds))
        step, examples = int(d["step"]), int(d["examples"])
        self._last_measured = (step, examples)
        scalars = measurement_scalars(d, layers=self.layer_kinds, layer_columns=self.layer_columns)
        self._write(step if self.x == "step" else examples, _wall(measurement), scalars)

    def on_metrics(self, metrics: Metrics) -> None:
        if not self.active:
            return
        at = self._position(metrics.step, metrics.examples)
        if at is None:
            return
        scalars = [(k, float(v)) for k, v in metrics.values.items() if v is not None]
        if scalars:
            self._write(at, metrics.wall_time, scalars)

    def on_event(self, event: Event) -> None:
        if not self.active:
            return
        at = None if event.step is None else self._position(event.step, event.examples)
        self._write_event(at, event)

    # -- for subclasses ----------------------------------------------------------------------------------------

    def _write(self, at: int, wall_time: float, scalars: Iterable[tuple[str, float]]) -> None:
        raise NotImplementedError

    def _write_event(self, at: int | None, event: Event) -> None:
        raise NotImplementedError

    # -- internals ---------------------------------------------------------------------------------------------

    def _position(self, step: int, examples: int | None) -> int | None:
        if self.x == "step":
            return step
        if examples is None and self._last_measured is not None and self._last_measured[0] == step:
            examples = self._last_measured[1]
        if examples is None and not self._warned_axis:
            self._warned_axis = True
            warnings.warn(
                f"noisescale: {type(self).__name__}(x='examples') got values for step {step}, whose examples count is "
                "unknown (no measurement at that step): they are left out; log them right after monitor.step()",
                RuntimeWarning,
                stacklevel=3,
            )
        return examples


def _wall(measurement: Any) -> float:
    import time

    wall = getattr(measurement, "wall_time", None)
    return float(wall) if wall is not None else time.time()
