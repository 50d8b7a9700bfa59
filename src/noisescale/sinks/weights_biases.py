"""``WandB``: every measurement and metric logged to a Weights & Biases run, events as a table at the end.

Two lines (into the run you already started with ``wandb.init``, or a new one)::

    sink = ns.sinks.WandB(project="my-project")
    monitor = ns.GNSMonitor(model, sinks=[sink])

Values are logged under the tags of ``noisescale.sinks.tags`` against their own x axis (``noisescale/step`` or
``noisescale/examples``, set with ``define_metric``), so they never disturb the steps of your own ``wandb.log``
calls.  ``WANDB_MODE=offline`` works as usual (nothing leaves the machine until ``wandb sync``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from noisescale.events import Event
from noisescale.sinks.scalars import Axis, Layers, ScalarSink, require
from noisescale.sinks.tags import PREFIX

__all__ = ["WandB"]


class WandB(ScalarSink):
    """Logs to a W&B run (needs ``wandb``: ``pip install 'noisescale[wandb]'``).

    Args:
        run: the W&B run to log to; by default the active one (``wandb.run``), else a new one started with
            ``wandb.init(**init_kwargs)`` and finished at close.
        x: x axis, ``"step"`` or ``"examples"`` (logged as ``noisescale/step`` or ``noisescale/examples``).
        layers, layer_columns: per-layer values to write (see ``ScalarSink``).
        **init_kwargs: for ``wandb.init`` when a new run is started (``project=``, ``name=``, ``dir=``, ...).

    Raises:
        ImportError: wandb is not installed (the message names the extra).
    """

    def __init__(
        self,
        *,
        run: Any = None,
        x: Axis = "step",
        layers: Layers = "param",
        layer_columns: Sequence[str] = ("b_simple",),
        **init_kwargs: Any,
    ) -> None:
        super().__init__(x=x, layers=layers, layer_columns=layer_columns)
        self.run: Any = None
        self._owned = False
        self._events: list[list[Any]] = []
        if not self.active:  # not rank 0
            return
        wandb = require("wandb", extra="wandb", what="noisescale.sinks.WandB")
        self._wandb = wandb
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self._owned = True
        self.run = run
        self.axis = f"{PREFIX}/{x}"
        run.define_metric(self.axis, hidden=False)
        run.define_metric(f"{PREFIX}/*", step_metric=self.axis)
        self._defined: set[str] = set()

    def _write(self, at: int, wall_time: float, scalars: Iterable[tuple[str, float]]) -> None:
        row: dict[str, Any] = {self.axis: at}
        for tag, value in scalars:
            if not tag.startswith(f"{PREFIX}/") and tag not in self._defined:
                self.run.define_metric(tag, step_metric=self.axis)  # the user's metrics on the same axis
                self._defined.add(tag)
            row[tag] = value
        self.run.log(row)

    def _write_event(self, at: int | None, event: Event) -> None:
        data = json.dumps(dict(event.data or {}), sort_keys=True, default=str)
        self._events.append([event.step, event.examples, event.kind, event.message, data])

    def close(self) -> None:
        if not self.active:
            return
        if self._events:
            table = self._wandb.Table(columns=["step", "examples", "kind", "message", "data"], data=self._events)
            self.run.log({f"{PREFIX}/events": table})
            self._events = []
        if self._owned:
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandB(run={getattr(self.run, 'id', None)!r})"
