"""Where notifications go: the Python log, your own function, W&B alerts (and a webhook, ``alerts.webhook``).

A channel is any object with ``notify(alert)`` and ``close()``.  The alert engine calls ``notify`` on the monitor's
sink thread, on rank 0 only, for every notified transition (rate limited by the rule's cooldown).  A channel must
return quickly: one that talks to the network hands the work to its own thread (``WebhookChannel``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from noisescale.errors import ConfigError

__all__ = ["Alert", "AlertStateName", "CallbackChannel", "Channel", "LogChannel", "WandbChannel"]

AlertStateName = Literal["pending", "firing", "resolved"]


@dataclass(frozen=True)
class Alert:
    """One notification: an alert that changed state (or is still firing, for a reminder).

    Attributes:
        rule: the rule's name.
        state: ``"pending"``, ``"firing"`` or ``"resolved"``.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        message: what is wrong, in plain language.
        action: the suggested action.
        value: the number behind it (see the rule), if any.
        layer: the layer it is about, for per-layer rules.
        step, examples: where in training it happened.
        wall_time: Unix time of the measurement that triggered it.
        reminder: a reminder that the alert still fires (``repeat_every``).
        suppressed: firings of this alert the cooldown dropped since the last notification.
    """

    rule: str
    state: AlertStateName
    severity: str
    message: str
    action: str
    value: float | None
    layer: str | None
    step: int
    examples: int
    wall_time: float
    reminder: bool = False
    suppressed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """One line for a person: ``[warning] batch_below_noise firing at step 120: ... Suggested action: ...``."""
        what = "still firing" if self.reminder else self.state
        where = f" (layer {self.layer})" if self.layer is not None else ""
        tail = "" if self.state == "resolved" else f" Suggested action: {self.action}."
        dropped = f" ({self.suppressed} earlier firing(s) not notified: cooldown)" if self.suppressed else ""
        return f"[{self.severity}] {self.rule}{where} {what} at step {self.step}: {self.message}.{tail}{dropped}"


@runtime_checkable
class Channel(Protocol):
    """Delivers alerts somewhere; ``notify`` must return quickly (it runs on the monitor's sink thread)."""

    def notify(self, alert: Alert) -> None: ...

    def close(self) -> None: ...


_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class LogChannel:
    """Writes each alert to the Python log (logger ``noisescale.alerts`` by default).

    Firing alerts are logged at the level of their severity (``info`` -> INFO, ``warning`` -> WARNING,
    ``critical`` -> ERROR), resolutions at INFO.
    """

    def __init__(self, logger: str | logging.Logger = "noisescale.alerts") -> None:
        self.logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)

    def notify(self, alert: Alert) -> None:
        level = logging.INFO if alert.state == "resolved" else _LEVELS.get(alert.severity, logging.WARNING)
        self.logger.log(level, "noisescale alert: %s", alert.text())

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"LogChannel({self.logger.name!r})"


class CallbackChannel:
    """Calls ``fn(alert)`` for each alert, on the monitor's sink thread (keep it quick)."""

    def __init__(self, fn: Callable[[Alert], object]) -> None:
        if not callable(fn):
            raise ConfigError(f"a callback channel needs a function of an Alert, got {type(fn).__name__}")
        self.fn = fn

    def notify(self, alert: Alert) -> None:
        self.fn(alert)

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"CallbackChannel({getattr(self.fn, '__qualname__', self.fn)!r})"


_WANDB_LEVELS = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}


class WandbChannel:
    """Sends each alert as a W&B alert (``wandb.Run.alert``, shown in the W&B app and sent to Slack or e-mail as
    set up there) when wandb is installed and a run is active; otherwise does nothing.

    It never imports wandb: if your script has not imported it, there can be no active W&B run.

    Args:
        run: the ``wandb`` run to alert on; by default ``wandb.run`` at the time of each alert.
        wait_duration: seconds W&B waits before sending another alert with the same title (W&B's own rate limit,
            on top of the rule's cooldown).
    """

    def __init__(self, run: Any = None, *, wait_duration: float = 1.0) -> None:
        self.run = run
        self.wait_duration = wait_duration
        self.sent = 0

    def notify(self, alert: Alert) -> None:
        run = self.run
        if run is None:
            wandb = sys.modules.get("wandb")
            run = getattr(wandb, "run", None) if wandb is not None else None
        if run is None:
            return
        title = f"noisescale: {alert.rule} {'still firing' if alert.reminder else alert.state}"[:63]
        run.alert(
            title=title,
            text=alert.text(),
            level=_WANDB_LEVELS.get(alert.severity, "WARN") if alert.state != "resolved" else "INFO",
            wait_duration=self.wait_duration,
        )
        self.sent += 1

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "WandbChannel()"
