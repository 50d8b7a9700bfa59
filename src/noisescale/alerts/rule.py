"""What a rule sees (``Observation``, ``History``), what it answers (``Check``), and the ``Rule`` itself.

A rule is a pure function of the recent history of measurements: no I/O, no clock, no randomness, so it takes the
same decision on every rank.  Its condition answers, at each measured step, whether something is wrong; the alert
state machine (``noisescale.alerts.state``) turns that into pending / firing / resolved with a hold time, a
hysteresis and a rate limit.  A rule of your own takes a few lines::

    def loss_too_high(history):
        loss = history.latest.get("loss")          # a measurement column, or a metric logged with monitor.log
        return None if loss is None else Check(loss > 5.0, value=loss)

    rule = Rule(name="loss_high", check=loss_too_high, summary="the training loss is above 5",
                action="lower the learning rate", hold_for=20)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from noisescale.alerts.state import Timing
from noisescale.errors import ConfigError

__all__ = [
    "Check",
    "CheckResult",
    "History",
    "LayerBand",
    "Observation",
    "Rule",
    "Severity",
    "Unit",
    "checks_of",
]

Severity = Literal["info", "warning", "critical"]
Unit = Literal["steps", "examples"]
SEVERITIES = ("info", "warning", "critical")
UNITS = ("steps", "examples")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class LayerBand:
    """One layer's smoothed B_simple and its band (``None`` where undefined)."""

    b_simple: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Observation:
    """One measured step, as plain numbers: what every rule reads.

    Attributes:
        step, examples, batch_size, status, skipped_steps: as in ``noisescale.Measurement``.
        values: the whole-model columns (``b_simple``, ``b_simple_low``, ..., ``grad_sq_raw``; ``None`` if undefined).
        metrics: the user's numbers logged (``monitor.log``) since the previous measurement, averaged per name.
        layers, modules: per parameter tensor and per module, B_simple with its band (filled only when a rule
            reads layers).
    """

    step: int
    examples: int
    batch_size: int
    status: str = "ok"
    skipped_steps: int = 0
    values: Mapping[str, float | None] = field(default_factory=dict)
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    layers: Mapping[str, LayerBand] = field(default_factory=dict)
    modules: Mapping[str, LayerBand] = field(default_factory=dict)

    def get(self, name: str) -> float | None:
        """A value by name: a measurement column, ``batch_size``/``step``/``examples``/``skipped_steps``, or a
        logged metric; ``None`` if there is none now."""
        if name in self.values:
            return self.values[name]
        if name in ("batch_size", "step", "examples", "skipped_steps"):
            return float(getattr(self, name))
        return self.metrics.get(name)

    def position(self, unit: Unit) -> float:
        """Where this step is on the training clock, in ``unit``."""
        return float(self.step if unit == "steps" else self.examples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "examples": self.examples,
            "batch_size": self.batch_size,
            "status": self.status,
            "skipped_steps": self.skipped_steps,
            "values": dict(self.values),
            "metrics": dict(self.metrics),
            "layers": {k: [v.b_simple, v.low, v.high] for k, v in self.layers.items()},
            "modules": {k: [v.b_simple, v.low, v.high] for k, v in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observation:
        return cls(
            step=int(d["step"]),
            examples=int(d["examples"]),
            batch_size=int(d["batch_size"]),
            status=str(d["status"]),
            skipped_steps=int(d["skipped_steps"]),
            values=dict(d["values"]),
            metrics=dict(d["metrics"]),
            layers={k: LayerBand(*v) for k, v in d["layers"].items()},
            modules={k: LayerBand(*v) for k, v in d["modules"].items()},
        )


class History:
    """The recent observations a rule may read, oldest first; ``latest`` is the step being evaluated.

    The engine keeps as much history as the rules' ``window`` asks for (plus the one observation just before it),
    so ``window(size)`` and ``before(distance)`` are exact for ``size, distance <= window``.
    """

    def __init__(self, observations: Sequence[Observation]) -> None:
        if not observations:
            raise ValueError("a history needs at least one observation")
        self.observations = observations

    @property
    def latest(self) -> Observation:
        return self.observations[-1]

    def window(self, size: float, unit: Unit = "steps") -> list[Observation]:
        """Observations less than ``size`` before the latest one (the latest included)."""
        now = self.latest.position(unit)
        return [o for o in self.observations if now - o.position(unit) < size]

    def before(self, distance: float, unit: Unit = "steps") -> Observation | None:
        """The newest observation at least ``distance`` before the latest one, if the history reaches back that far."""
        now = self.latest.position(unit)
        for o in reversed(self.observations):
            if now - o.position(unit) >= distance:
                return o
        return None

    def values(self, name: str, size: float, unit: Unit = "steps") -> list[float]:
        """The defined values of ``name`` (see ``Observation.get``) within ``window(size)``, oldest first."""
        return [v for o in self.window(size, unit) if (v := o.get(name)) is not None]

    def __len__(self) -> int:
        return len(self.observations)


@dataclass(frozen=True)
class Check:
    """A rule's answer for one step (and one layer, for per-layer rules).

    Attributes:
        active: whether the condition holds (something is wrong) now.
        value: the number behind the answer, recorded with the alert (e.g. the ratio of batch to B_simple).
        layer: the layer this answer is about (per-layer rules answer once per layer; each is its own alert).
        message: a plain-language sentence for this instance; the rule's ``summary`` when ``None``.
    """

    active: bool
    value: float | None = None
    layer: str | None = None
    message: str | None = None


CheckResult = Check | bool | Iterable[Check] | None
"""What a rule's ``check`` returns: ``None`` when it cannot tell (no data yet: the alert is left as it is), a bool
or a ``Check``, or one ``Check`` per layer."""


def checks_of(result: CheckResult, rule_name: str) -> list[Check]:
    """A rule's answer as a list of checks (empty when it could not tell)."""
    if result is None:
        return []
    if isinstance(result, bool):
        return [Check(result)]
    if isinstance(result, Check):
        return [result]
    try:
        checks = list(result)
    except TypeError:
        raise TypeError(
            f"the check of rule {rule_name!r} returned {type(result).__name__}; expected None, a bool, a Check or "
            "an iterable of Checks"
        ) from None
    for c in checks:
        if not isinstance(c, Check):
            raise TypeError(
                f"the check of rule {rule_name!r} returned an iterable holding {type(c).__name__}, not Check"
            )
    return checks


@dataclass(frozen=True, kw_only=True)
class Rule:
    """An alert rule: a condition over the history, a plain-language summary and action, and its timing.

    Attributes:
        name: a short identifier (letters, digits, ``_.-``), the ``rule`` of its alert events.
        check: ``check(history) -> CheckResult``; must be pure (the same history gives the same answer).
        summary: what is wrong, in one sentence (the alert's message unless the check gives its own).
        action: what to do about it, in one sentence.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        unit: ``"steps"`` or ``"examples"``: the unit of every duration below.
        hold_for: the condition must hold this long before the alert fires.
        clear_for: and stay false this long before it resolves (hysteresis).
        cooldown: at least this long between two notified firings (rate limit; see ``noisescale.alerts.state``).
        repeat_every: remind this often while firing (``None``: never).
        window: how far back ``check`` reads the history (the engine keeps that much).
        warmup: the rule is not evaluated before this position (the smoothed estimates are still settling).
        layers: ``check`` reads per-layer values (``Observation.layers``/``modules``), which are then recorded.

    Raises:
        ConfigError: a bad name, severity, unit or duration.
    """

    name: str
    check: Callable[[History], CheckResult]
    summary: str
    action: str
    severity: Severity = "warning"
    unit: Unit = "steps"
    hold_for: float = 0.0
    clear_for: float = 0.0
    cooldown: float = 0.0
    repeat_every: float | None = None
    window: float = 0.0
    warmup: float = 0.0
    layers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"a rule name must be letters, digits and _.- (e.g. 'loss_high'), got {self.name!r}")
        if not callable(self.check):
            raise ConfigError(f"rule {self.name!r}: check must be a function of the history, got {self.check!r}")
        for what in ("summary", "action"):
            text = getattr(self, what)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"rule {self.name!r}: {what} must be a non-empty sentence, got {text!r}")
        if self.severity not in SEVERITIES:
            raise ConfigError(f"rule {self.name!r}: severity must be one of {list(SEVERITIES)}, got {self.severity!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"rule {self.name!r}: unit must be one of {list(UNITS)}, got {self.unit!r}")
        for what in ("hold_for", "clear_for", "cooldown", "window", "warmup", "repeat_every"):
            v = getattr(self, what)
            if what == "repeat_every" and v is None:
                continue
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
            if not ok or (what == "repeat_every" and v == 0):
                lowest = "a positive number or None" if what == "repeat_every" else "a non-negative number"
                raise ConfigError(f"rule {self.name!r}: {what} must be {lowest} of {self.unit}, got {v!r}")

    @property
    def timing(self) -> Timing:
        return Timing(
            hold_for=float(self.hold_for),
            clear_for=float(self.clear_for),
            cooldown=float(self.cooldown),
            repeat_every=None if self.repeat_every is None else float(self.repeat_every),
        )
