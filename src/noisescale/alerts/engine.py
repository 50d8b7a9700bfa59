"""``AlertEngine``: a sink that evaluates alert rules on every measurement and reports what changed as events.

Put it in the monitor's sinks; the events it returns reach every other sink, so a run store records them::

    monitor = ns.GNSMonitor(model, sinks=[run, ns.alerts.default_rules()])

Each rule (and, for per-layer rules, each layer) is one alert with its own state.  At every measurement the
engine builds an ``Observation`` (the measurement's numbers and the metrics logged since the previous one),
asks every rule, advances each alert's state machine (``noisescale.alerts.state``) and returns one ``Event`` of
kind ``"alert"`` per transition to pending, firing or resolved.  The decisions are a pure function of the
measurements and metrics, so they are the same on every rank; only rank 0 notifies the delivery channels.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from noisescale.alerts.channels import Alert, Channel, LogChannel, WandbChannel
from noisescale.alerts.rule import Check, History, LayerBand, Observation, Rule, checks_of
from noisescale.alerts.state import AlertState, Transition, advance
from noisescale.errors import ConfigError
from noisescale.events import Event, Metrics
from noisescale.types import COLUMNS

if TYPE_CHECKING:
    from noisescale.types import Measurement

__all__ = ["NOTIFY_STATES", "AlertEngine"]

NOTIFY_STATES = ("firing", "resolved")
_STATE_VERSION = 1
_Key = tuple[str, str | None]  # (rule name, layer)


class AlertEngine:
    """Evaluates rules on each measurement; a sink (``noisescale.sink.Sink``) returning ``"alert"`` events.

    Args:
        rules: the rules to evaluate (see ``noisescale.alerts.builtin_rules``, or write your own ``Rule``).
        channels: where notifications go, on rank 0 only; by default the Python log and, when a W&B run is
            active, W&B alerts.  Pass ``[]`` to record events only.
        notify_states: which transitions are notified: any of ``"pending"``, ``"firing"`` (reminders included),
            ``"resolved"``.  Every transition is recorded as an event either way.
        rank: this process's rank; ``None`` reads it from ``torch.distributed`` at the first notification.

    Events have kind ``"alert"``, the alert's plain-language text as message, and data ``{"rule", "state",
    "severity", "action", "value", "layer", "notified", "suppressed"}`` (``notified``: whether the channels were
    told; ``suppressed``: firings the cooldown dropped before this one).

    Raises:
        ConfigError: two rules with one name, or a bad channel or state.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        channels: Sequence[Channel] | None = None,
        notify_states: Sequence[str] = NOTIFY_STATES,
        rank: int | None = None,
    ) -> None:
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        for r in self.rules:
            if not isinstance(r, Rule):
                raise ConfigError(f"rules must be noisescale.alerts.Rule objects, got {type(r).__name__}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"each rule needs its own name; these appear more than once: {dupes}")
        self.channels: list[Channel] = list(channels) if channels is not None else [LogChannel(), WandbChannel()]
        for c in self.channels:
            if not (callable(getattr(c, "notify", None)) and callable(getattr(c, "close", None))):
                raise ConfigError(f"a channel needs notify(alert) and close() methods, got {type(c).__name__}")
        bad = [s for s in notify_states if s not in ("pending", "firing", "resolved")]
        if bad:
            raise ConfigError(f"notify_states must be among 'pending', 'firing', 'resolved', got {bad}")
        self.notify_states = tuple(notify_states)
        self._rank = rank
        self._read_layers = any(r.layers for r in self.rules)
        self._history: deque[Observation] = deque()
        self._states: dict[_Key, AlertState] = {}
        self._metric_sums: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self.notified = 0
        self.channel_errors = 0
        self.rule_errors: dict[str, int] = {}

    # -- the sink interface ------------------------------------------------------------------------------------

    def on_measurement(self, measurement: Measurement) -> list[Event]:
        """Evaluate every rule on this measurement; the events of what changed."""
        obs = self.observe(measurement)
        return self.evaluate(obs, wall_time=getattr(measurement, "wall_time", None))

    def on_metrics(self, metrics: Metrics) -> None:
        """Remember the user's numbers until the next measurement (averaged per name)."""
        with self._lock:
            for key, value in metrics.values.items():
                if value is None:
                    continue
                total, n = self._metric_sums.get(key, (0.0, 0))
                self._metric_sums[key] = (total + float(value), n + 1)

    def on_event(self, event: Event) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        """Close every channel (a webhook sends what it still holds, within its ``close_timeout``)."""
        for c in self.channels:
            try:
                c.close()
            except Exception:  # one channel must not keep the others from closing
                self.channel_errors += 1

    # -- evaluation --------------------------------------------------------------------------------------------

    def observe(self, measurement: Measurement) -> Observation:
        """The ``Observation`` of a measurement, with the metrics logged since the previous one."""
        d = measurement.to_dict(per_layer=self._read_layers)
        with self._lock:
            metrics = {k: total / n for k, (total, n) in self._metric_sums.items()}
            self._metric_sums = {}
        return Observation(
            step=int(d["step"]),
            examples=int(d["examples"]),
            batch_size=int(d["batch_size"]),
            status=str(d["status"]),
            skipped_steps=int(d["skipped_steps"]),
            values={c: d[c] for c in COLUMNS},
            metrics=metrics,
            layers=_bands(d.get("layers")),
            modules=_bands(d.get("modules")),
        )

    def evaluate(self, obs: Observation, *, wall_time: float | None = None) -> list[Event]:
        """Add ``obs`` to the history, evaluate every rule, notify the channels; the events of what changed."""
        with self._lock:
            self._history.append(obs)
            self._prune()
            history = History(tuple(self._history))
            found: list[tuple[Rule, Check, AlertState, Transition]] = []
            for rule in self.rules:
                at = obs.position(rule.unit)
                if at < rule.warmup:
                    continue
                try:
                    checks = checks_of(rule.check(history), rule.name)
                except Exception as e:  # one broken rule must not silence the others
                    self._rule_failed(rule, e)
                    continue
                for check in checks:
                    key = (rule.name, check.layer)
                    state, transitions = advance(
                        self._states.get(key, AlertState()),
                        bool(check.active),
                        at,
                        rule.timing,
                        value=check.value,
                        message=check.message or rule.summary,
                    )
                    self._states[key] = state
                    found.extend((rule, check, state, t) for t in transitions)
        events = []
        alerts = []
        wall = wall_time if wall_time is not None else time.time()
        for rule, check, state, t in found:
            alert = _alert(rule, check, state, t, obs, wall)
            if t.kind in ("pending", "firing", "resolved") and not t.late:
                events.append(_event(alert, t, wall))
            if t.notify and (alert.state in self.notify_states):
                alerts.append(alert)
        if alerts and self._is_rank_zero():
            for alert in alerts:
                self._notify(alert)
        return events

    def firing(self) -> list[tuple[str, str | None]]:
        """The alerts firing now, as ``(rule, layer)``."""
        with self._lock:
            return sorted((k for k, s in self._states.items() if s.phase == "firing"), key=lambda k: (k[0], k[1] or ""))

    def state(self, rule: str, layer: str | None = None) -> AlertState:
        """One alert's current state (``inactive`` if never seen)."""
        with self._lock:
            return self._states.get((rule, layer), AlertState())

    # -- checkpointing -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Alert states, the history the rules read, and the metrics waiting for the next measurement."""
        with self._lock:
            return {
                "version": _STATE_VERSION,
                "rules": [r.name for r in self.rules],
                "alerts": [[name, layer, s.to_dict()] for (name, layer), s in self._states.items()],
                "history": [o.to_dict() for o in self._history],
                "metric_sums": {k: list(v) for k, v in self._metric_sums.items()},
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; alerts of rules this engine does not have are left out."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(
                f"unsupported alert engine state version {state.get('version')!r}; expected {_STATE_VERSION}"
            )
        names = {r.name for r in self.rules}
        with self._lock:
            self._states = {
                (name, layer): AlertState.from_dict(s) for name, layer, s in state["alerts"] if name in names
            }
            self._history = deque(Observation.from_dict(o) for o in state["history"])
            self._metric_sums = {k: (float(v[0]), int(v[1])) for k, v in state["metric_sums"].items()}

    # -- internals ---------------------------------------------------------------------------------------------

    def _prune(self) -> None:
        """Keep what the rules read: per unit, everything within the longest window, plus the one before it."""
        spans = {u: max((r.window for r in self.rules if r.unit == u), default=None) for u in ("steps", "examples")}
        latest = self._history[-1]

        def needed(o: Observation) -> bool:
            return any(
                span is not None and latest.position(unit) - o.position(unit) < span  # type: ignore[arg-type]
                for unit, span in spans.items()
            )

        # drop the oldest while the one after it already reaches back far enough
        while len(self._history) >= 2 and not needed(self._history[1]):
            self._history.popleft()

    def _rule_failed(self, rule: Rule, error: Exception) -> None:
        self.rule_errors[rule.name] = self.rule_errors.get(rule.name, 0) + 1
        if self.rule_errors[rule.name] == 1:
            warnings.warn(
                f"noisescale: the alert rule {rule.name!r} raised {error!r}; it is skipped at that step, the other "
                "rules go on, and its further errors are counted silently (AlertEngine.rule_errors)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _is_rank_zero(self) -> bool:
        if self._rank is None:
            self._rank = _rank()
        return self._rank == 0

    def _notify(self, alert: Alert) -> None:
        for c in self.channels:
            try:
                c.notify(alert)
                self.notified += 1
            except Exception as e:
                self.channel_errors += 1
                if self.channel_errors == 1:
                    warnings.warn(
                        f"noisescale: the alert channel {c!r} raised {e!r}; further errors are counted silently "
                        "(AlertEngine.channel_errors)",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    def __repr__(self) -> str:
        return f"AlertEngine({[r.name for r in self.rules]})"


def _bands(rows: Any) -> dict[str, LayerBand]:
    if not rows:
        return {}
    return {name: LayerBand(v["b_simple"], v["b_simple_low"], v["b_simple_high"]) for name, v in rows.items()}


def _alert(rule: Rule, check: Check, state: AlertState, t: Transition, obs: Observation, wall: float) -> Alert:
    kind = "firing" if t.kind == "reminder" else t.kind
    message = state.message or rule.summary
    if kind == "resolved":
        message = f"resolved: {message}"
    return Alert(
        rule=rule.name,
        state=kind,
        severity=rule.severity,
        message=message,
        action=rule.action,
        value=state.value,
        layer=check.layer,
        step=obs.step,
        examples=obs.examples,
        wall_time=wall,
        reminder=t.kind == "reminder",
        suppressed=t.suppressed,
    )


def _event(alert: Alert, t: Transition, wall: float) -> Event:
    data = {
        "rule": alert.rule,
        "state": alert.state,
        "severity": alert.severity,
        "action": alert.action,
        "value": alert.value,
        "layer": alert.layer,
        "notified": t.notify,
        "suppressed": t.suppressed,
    }
    return Event("alert", alert.message, step=alert.step, examples=alert.examples, wall_time=wall, data=data)


def _rank() -> int:
    """This process's data-parallel rank (0 when not distributed); read once, at the first notification."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0
