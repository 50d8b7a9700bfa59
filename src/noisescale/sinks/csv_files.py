"""``CSV``: measurements, per-layer values, metrics and events as four CSV files (standard library only).

Two lines::

    sink = ns.sinks.CSV("csv/")
    monitor = ns.GNSMonitor(model, sinks=[sink])

Files in the folder: ``measurements.csv`` (one row per step: ``step, examples, wall_time, batch_size, source,
coverage, status, skipped_steps`` and the ``COLUMNS`` of ``noisescale.types``), ``layers.csv`` (one row per layer
and step: ``step, examples, kind, name`` and the columns; ``kind`` is ``param`` or ``module``), ``metrics.csv``
(``step, examples, wall_time, key, value``) and ``events.csv`` (``step, examples, wall_time, kind, message, data``,
data as JSON).  Numbers are written with ``repr``, so reading them back with ``float`` gives the same bits; an
undefined value is an empty cell, an unbounded band edge ``inf``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import IO, Any

from noisescale.errors import ConfigError
from noisescale.events import Event, Metrics
from noisescale.sink import BaseSink
from noisescale.sinks.scalars import is_rank_zero
from noisescale.types import COLUMNS

__all__ = ["CSV", "EVENT_FIELDS", "LAYER_FIELDS", "MEASUREMENT_FIELDS", "METRIC_FIELDS"]

MEASUREMENT_FIELDS = (
    "step",
    "examples",
    "wall_time",
    "batch_size",
    "source",
    "coverage",
    "status",
    "skipped_steps",
    *COLUMNS,
)
LAYER_FIELDS = ("step", "examples", "kind", "name", *COLUMNS)
METRIC_FIELDS = ("step", "examples", "wall_time", "key", "value")
EVENT_FIELDS = ("step", "examples", "wall_time", "kind", "message", "data")
_FILES = {
    "measurements": MEASUREMENT_FIELDS,
    "layers": LAYER_FIELDS,
    "metrics": METRIC_FIELDS,
    "events": EVENT_FIELDS,
}


class CSV(BaseSink):
    """Writes CSV files into ``dir`` (created if missing; files already there are never overwritten).

    Args:
        dir: the folder.
        layers: also write per-layer values (``layers.csv``).

    On a data-parallel rank other than 0 the sink is inactive (``active`` is ``False``): no folder, no file.

    Raises:
        ConfigError: the folder already holds one of the files (choose a new folder for each run).
    """

    def __init__(self, dir: str | os.PathLike[str], *, layers: bool = True) -> None:
        self.dir = Path(dir)
        self.layers = layers
        self._files: dict[str, IO[str]] = {}
        self._writers: dict[str, Any] = {}
        self.active = is_rank_zero()
        if not self.active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, fields in _FILES.items():
                if name == "layers" and not layers:
                    continue
                path = self.dir / f"{name}.csv"
                try:
                    f = open(path, "x", newline="", encoding="utf-8")
                except FileExistsError:
                    raise ConfigError(
                        f"{path} already exists: noisescale.sinks.CSV never overwrites a run; give each run its own "
                        "folder"
                    ) from None
                self._files[name] = f
                self._writers[name] = csv.writer(f)
                self._writers[name].writerow(fields)
        except BaseException:
            self.close()
            raise

    def on_measurement(self, measurement: Any) -> None:
        if not self.active:
            return
        d = measurement.to_dict(per_layer=self.layers)
        wall = getattr(measurement, "wall_time", None)
        row = [d["step"], d["examples"], wall, d["batch_size"], d["source"], d["coverage"], d["status"]]
        row += [d["skipped_steps"], *(d[c] for c in COLUMNS)]
        self._writers["measurements"].writerow([_cell(v) for v in row])
        if self.layers:
            w = self._writers["layers"]
            for kind, key in (("param", "layers"), ("module", "modules")):
                for name, values in (d.get(key) or {}).items():
                    w.writerow([d["step"], d["examples"], kind, name, *(_cell(values[c]) for c in COLUMNS)])

    def on_metrics(self, metrics: Metrics) -> None:
        if not self.active:
            return
        w = self._writers["metrics"]
        for key, value in metrics.values.items():
            w.writerow([metrics.step, _cell(metrics.examples), _cell(metrics.wall_time), key, _cell(value)])

    def on_event(self, event: Event) -> None:
        if not self.active:
            return
        data = "" if event.data is None else json.dumps(dict(event.data), sort_keys=True, default=str)
        row = [_cell(event.step), _cell(event.examples), _cell(event.wall_time), event.kind, event.message, data]
        self._writers["events"].writerow(row)

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __repr__(self) -> str:
        return f"CSV({str(self.dir)!r})"


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value
