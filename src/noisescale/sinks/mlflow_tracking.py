"""``MLflow``: every measurement and metric as MLflow metrics, events as a JSON-lines artifact at the end.

Two lines (into the active ``mlflow.start_run()``, or a new run)::

    sink = ns.sinks.MLflow(experiment="noise")
    monitor = ns.GNSMonitor(model, sinks=[sink])

Metrics are sent in batches (``log_batch``, at most 1000 per request) when ``batch`` of them are waiting and at
every flush, which also rewrites the events artifact (``noisescale/events.jsonl``): a remote tracking server sees
one request per many steps, from the monitor's sink thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from noisescale.events import Event
from noisescale.sinks.scalars import Axis, Layers, ScalarSink, require

__all__ = ["MLflow"]

_MAX_PER_REQUEST = 1000  # MLflow's limit of metrics in one log_batch


class MLflow(ScalarSink):
    """Logs to an MLflow run (needs ``mlflow`` or ``mlflow-skinny``: ``pip install 'noisescale[mlflow]'``).

    Args:
        run_id: the run to log to; by default the active one (``mlflow.active_run()``, when ``tracking_uri`` is not
            given), else a new run, ended at close.
        experiment: the experiment of a new run, by name (created if missing; default ``"Default"``).
        run_name: the name of a new run.
        tracking_uri: where MLflow stores runs (``file:///...``, ``http://...``); MLflow's default otherwise.
        x: the MLflow ``step`` of each value: ``"step"`` or ``"examples"``.
        layers, layer_columns: per-layer values to write (see ``ScalarSink``).
        batch: metrics held before a ``log_batch`` request (they are also sent at every flush).

    Raises:
        ImportError: mlflow is not installed (the message names the extra).
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        x: Axis = "step",
        layers: Layers = "param",
        layer_columns: Sequence[str] = ("b_simple",),
        batch: int = 1000,
    ) -> None:
        super().__init__(x=x, layers=layers, layer_columns=layer_columns)
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._events: list[str] = []
        self._events_written = 0
        self._owned = False
        if not self.active:  # not rank 0
            return
        mlflow = require("mlflow", extra="mlflow", what="noisescale.sinks.MLflow")
        tracking = require("mlflow.tracking", extra="mlflow", what="noisescale.sinks.MLflow", package="mlflow")
        entities = require("mlflow.entities", extra="mlflow", what="noisescale.sinks.MLflow", package="mlflow")
        self._Metric = entities.Metric
        self.batch = max(1, int(batch))
        self.client = tracking.MlflowClient(tracking_uri)
        if run_id is None and tracking_uri is None and mlflow.active_run() is not None:
            run_id = mlflow.active_run().info.run_id
        if run_id is None:
            name = experiment or "Default"
            found = self.client.get_experiment_by_name(name)
            exp_id = found.experiment_id if found is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            self._owned = True
        self.run_id = run_id

    def _write(self, at: int, wall_time: float, scalars: Iterable[tuple[str, float]]) -> None:
        ms = int(wall_time * 1000)
        self._pending.extend(self._Metric(key=tag, value=value, timestamp=ms, step=at) for tag, value in scalars)
        if len(self._pending) >= self.batch:
            self._send()

    def _write_event(self, at: int | None, event: Event) -> None:
        record = {
            "step": event.step,
            "examples": event.examples,
            "wall_time": event.wall_time,
            "kind": event.kind,
            "message": event.message,
            "data": dict(event.data or {}),
        }
        self._events.append(json.dumps(record, sort_keys=True, default=str))

    def flush(self) -> None:
        if not self.active:
            return
        self._send()
        if len(self._events) > self._events_written:  # the artifact is rewritten whole: MLflow cannot append
            self.client.log_text(self.run_id, "\n".join(self._events) + "\n", "noisescale/events.jsonl")
            self._events_written = len(self._events)

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self._owned:
            self.client.set_terminated(self.run_id)

    def _send(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:_MAX_PER_REQUEST], self._pending[_MAX_PER_REQUEST:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def __repr__(self) -> str:
        return f"MLflow(run_id={self.run_id!r})"
