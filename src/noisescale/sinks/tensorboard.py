"""``TensorBoard``: every measurement, metric and event as TensorBoard scalars and text, plus a ready-made layout.

Two lines::

    tb = ns.sinks.TensorBoard("tb/")
    monitor = ns.GNSMonitor(model, sinks=[tb])

Scalars are written in double precision (the stored value is the measured one, bit for bit) with the tags of
``noisescale.sinks.tags``; events (alerts, controller decisions) as text under ``noisescale/events``.  The Custom
Scalars dashboard gets a ``noisescale`` section: B_simple with its band as a Margin chart, and B_simple, its band
and the batch size on one chart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from noisescale.events import Event
from noisescale.sinks.scalars import Axis, Layers, ScalarSink, require
from noisescale.sinks.tags import whole_tag

__all__ = ["TensorBoard", "custom_scalars_layout"]


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout (``SummaryWriter.add_custom_scalars``) of the ``noisescale`` section."""
    b, low, high, batch = (whole_tag(c) for c in ("b_simple", "b_simple_low", "b_simple_high", "batch_size"))
    return {
        "noisescale": {
            "B_simple and its band": ["Margin", [b, low, high]],
            # Multiline tags are regular expressions: anchored, so b_simple does not also match b_simple_raw.
            "B_simple, its band and the batch size": ["Multiline", [f"^{b}$", f"^{low}$", f"^{high}$", f"^{batch}$"]],
        }
    }


class TensorBoard(ScalarSink):
    """Writes to a TensorBoard log folder (needs ``tensorboard``: ``pip install 'noisescale[tensorboard]'``).

    Args:
        log_dir: the folder (``tensorboard --logdir`` it, or a folder above it).
        x: x axis, ``"step"`` or ``"examples"`` (TensorBoard's ``global_step``).
        layers, layer_columns: per-layer values to write (see ``ScalarSink``).
        flush_secs: how often the writer flushes to disk by itself.
        writer: a ``SummaryWriter`` of your own to write into (left open at close); ``log_dir`` is then unused.

    Raises:
        ImportError: tensorboard is not installed (the message names the extra).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "tb",
        *,
        x: Axis = "step",
        layers: Layers = "param",
        layer_columns: Sequence[str] = ("b_simple",),
        flush_secs: float = 10.0,
        writer: Any = None,
    ) -> None:
        super().__init__(x=x, layers=layers, layer_columns=layer_columns)
        self.log_dir = os.fspath(log_dir)
        self._owned = False
        if not self.active:  # not rank 0
            return
        if writer is None:
            require("tensorboard", extra="tensorboard", what="noisescale.sinks.TensorBoard")
            summary = require("torch.utils.tensorboard", extra="tensorboard", what="noisescale.sinks.TensorBoard")
            writer = summary.SummaryWriter(log_dir=os.fspath(log_dir), flush_secs=flush_secs)
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.log_dir = str(writer.get_logdir()) if hasattr(writer, "get_logdir") else os.fspath(log_dir)
        writer.add_custom_scalars(custom_scalars_layout())

    def _write(self, at: int, wall_time: float, scalars: Iterable[tuple[str, float]]) -> None:
        for tag, value in scalars:
            # new_style + double_precision: a float64 tensor, so the file holds the measured value bit for bit
            self.writer.add_scalar(
                tag, value, global_step=at, walltime=wall_time, new_style=True, double_precision=True
            )

    def _write_event(self, at: int | None, event: Event) -> None:
        self.writer.add_text("noisescale/events", event_markdown(event), global_step=at, walltime=event.wall_time)

    def flush(self) -> None:
        if self.active:
            self.writer.flush()

    def close(self) -> None:
        if not self.active:
            return
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoard({self.log_dir!r})"


def event_markdown(event: Event) -> str:
    """An event as one Markdown paragraph (TensorBoard renders text summaries as Markdown)."""
    head = f"**{event.kind}**"
    data = dict(event.data or {})
    if event.kind == "alert":
        head += f" {data.get('state', '')} ({data.get('severity', '')}, rule `{data.get('rule', '')}`)"
    text = f"{head}: {_escape(event.message)}" if event.message else head
    if event.kind == "alert" and data.get("action") and data.get("state") != "resolved":
        text += f"  \nSuggested action: {_escape(str(data['action']))}"
    if data:
        text += f"  \n`{json.dumps(data, sort_keys=True, default=str)}`"
    return text


def _escape(text: str) -> str:
    # TensorBoard renders Markdown and sanitises HTML; keep user text from turning into markup.
    return text.replace("<", "&lt;").replace(">", "&gt;")
