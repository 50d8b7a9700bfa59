"""Feeding a finished (or running) run store to a sink, as if its training were happening again.

``noisescale export`` uses it to turn a run file into TensorBoard event files or CSV files: every measurement
(with its per-layer rows), every logged metric and every event go to the sink's usual methods, in that order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from noisescale.events import Event, Metrics
from noisescale.sink import Sink
from noisescale.store.reader import RunReader
from noisescale.types import COLUMNS

__all__ = ["StoredMeasurement", "replay"]


@dataclass(frozen=True)
class StoredMeasurement:
    """A measurement read back from a run store, with the part of ``Measurement``'s interface sinks use."""

    row: dict[str, Any]
    wall_time: float

    @property
    def step(self) -> int:
        return int(self.row["step"])

    @property
    def status(self) -> str:
        return str(self.row["status"])

    def to_dict(self, *, per_layer: bool = True) -> dict[str, Any]:
        if per_layer:
            return dict(self.row)
        return {k: v for k, v in self.row.items() if k not in ("layers", "modules")}


def replay(reader: RunReader, sink: Sink) -> dict[str, int]:
    """Send every measurement, metric and event of ``reader``'s run to ``sink``; returns how many of each.

    The sink is neither flushed nor closed here.
    """
    with reader.snapshot():
        rows = reader.measurements()
        per_step: dict[int, dict[str, dict[str, dict[str, Any]]]] = defaultdict(
            lambda: {"layers": defaultdict(dict), "modules": defaultdict(dict)}
        )
        for kind, key in (("param", "layers"), ("module", "modules")):
            for column in COLUMNS:
                matrix = reader.layer_matrix(column, kind=kind)  # type: ignore[arg-type]
                for i, name in enumerate(matrix.names):
                    for j, step in enumerate(matrix.step):
                        per_step[step][key][name][column] = matrix.values[i][j]
        metrics = [(key, reader.metric(key)) for key in reader.metric_names()]
        events = reader.events()
    for row in rows:
        step = int(row["step"])
        layer_rows = per_step.get(step, {"layers": {}, "modules": {}})
        full = {k: v for k, v in row.items() if k != "wall_time"}
        full["layers"] = {n: dict(v) for n, v in layer_rows["layers"].items() if len(v) == len(COLUMNS)}
        full["modules"] = {n: dict(v) for n, v in layer_rows["modules"].items() if len(v) == len(COLUMNS)}
        sink.on_measurement(StoredMeasurement(full, float(row["wall_time"])))  # type: ignore[arg-type]
    n_values = 0
    for key, series in metrics:
        for step, examples, wall, value in zip(series.step, series.examples, series.wall_time, series.value):
            sink.on_metrics(Metrics(step=step, examples=examples, wall_time=wall, values={key: value}))
            n_values += 1
    for e in events:
        sink.on_event(
            Event(
                kind=e["kind"],
                message=e["message"] or "",
                step=e["step"],
                examples=e["examples"],
                wall_time=e["wall_time"],
                data=e["data"] if isinstance(e["data"], dict) else None,
            )
        )
    return {"measurements": len(rows), "metrics": n_values, "events": len(events)}
