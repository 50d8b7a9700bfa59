"""Alerts: rules over the noise scale and your metrics, raised with a suggested action.

Turn them on with one more sink; the run store records every alert as an event::

    monitor = ns.GNSMonitor(model, sinks=[run, ns.alerts.default_rules()])

Rules are pure (``rule``, ``builtin``), their timing is a state machine counted in steps or examples (``state``),
the engine is a sink (``engine``), and notifications go to delivery channels on rank 0 only (``channels``,
``webhook``).  See docs/alerts.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from noisescale.alerts.builtin import (
    batch_above_noise,
    batch_below_noise,
    builtin_rules,
    grad_sq_unreliable,
    layer_outlier,
    loss_stalled,
    noise_jump,
    nonfinite_steps,
)
from noisescale.alerts.channels import Alert, CallbackChannel, Channel, LogChannel, WandbChannel
from noisescale.alerts.engine import AlertEngine
from noisescale.alerts.rule import Check, History, LayerBand, Observation, Rule
from noisescale.alerts.state import AlertState, Timing, Transition, advance
from noisescale.alerts.webhook import WebhookChannel

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertState",
    "CallbackChannel",
    "Channel",
    "Check",
    "History",
    "LayerBand",
    "LogChannel",
    "Observation",
    "Rule",
    "Timing",
    "Transition",
    "WandbChannel",
    "WebhookChannel",
    "advance",
    "batch_above_noise",
    "batch_below_noise",
    "builtin_rules",
    "default_rules",
    "grad_sq_unreliable",
    "layer_outlier",
    "loss_stalled",
    "noise_jump",
    "nonfinite_steps",
]


def default_rules(
    *, extra: Iterable[Rule] = (), channels: Sequence[Channel] | None = None, notify_states: Sequence[str] | None = None
) -> AlertEngine:
    """An alert engine with every built-in rule (and your ``extra`` ones), ready to pass in ``sinks=``.

    Args:
        extra: more rules, evaluated after the built-in ones.
        channels: delivery channels (default: the Python log, and W&B alerts when a W&B run is active).
        notify_states: which transitions are notified (default ``("firing", "resolved")``).
    """
    kwargs = {} if notify_states is None else {"notify_states": notify_states}
    return AlertEngine([*builtin_rules(), *extra], channels=channels, **kwargs)  # type: ignore[arg-type]
