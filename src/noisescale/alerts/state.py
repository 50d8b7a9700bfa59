"""The life of one alert: inactive -> pending -> firing -> resolved, as a pure function of what its rule saw.

Time is a *position* on the training clock, counted in optimizer steps or in examples seen, never in seconds, so
every rank (which sees the same measurements, bit for bit) takes the same decision at the same step:

- ``inactive``: the condition is false.  When it turns true the alert becomes ``pending`` (or ``firing`` at once
  when ``hold_for`` is 0).
- ``pending``: firing once the condition has held for ``hold_for`` (the first evaluation at a position at least
  ``hold_for`` after the one where it was first seen true); back to ``inactive``, silently, if it turns false first.
- ``firing``: resolved once the condition has been false for ``clear_for`` (hysteresis: a condition that flickers
  back to true before that keeps the alert firing); then ``inactive`` again.

Notifications are rate limited, the alert itself never is (its transitions are all recorded):

- ``cooldown``: a new firing within ``cooldown`` of the last notified one is *held back*; it is notified late if it
  still fires once the cooldown has passed, and dropped (counted in ``suppressed``) if it resolves before.
- ``repeat_every``: while firing, a reminder every ``repeat_every`` (``None``: never).

This is the same model as Prometheus alerting rules (``for``, ``keep_firing_for``) and Alertmanager's
``repeat_interval``, with the clock replaced by the training's own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["AlertState", "Phase", "Timing", "Transition", "TransitionKind", "advance"]

Phase = Literal["inactive", "pending", "firing"]
TransitionKind = Literal["pending", "firing", "resolved", "reminder"]


@dataclass(frozen=True, kw_only=True)
class Timing:
    """How long a condition must hold or stay clear, and how often to notify; all in the rule's unit.

    Attributes:
        hold_for: the condition must hold this long before the alert fires (0: fire on the first true evaluation).
        clear_for: the condition must stay false this long before a firing alert resolves (0: at once).
        cooldown: at least this long between two notified firings of the same alert.
        repeat_every: remind while firing, this often; ``None`` for never.
    """

    hold_for: float = 0.0
    clear_for: float = 0.0
    cooldown: float = 0.0
    repeat_every: float | None = None


@dataclass(frozen=True, kw_only=True)
class AlertState:
    """Where one alert stands (frozen; ``advance`` returns a new one).

    Attributes:
        phase: ``"inactive"``, ``"pending"`` or ``"firing"``.
        active_since: position where the condition was first seen true in this episode.
        clear_since: while firing, position where the condition was first seen false (``None`` while it holds).
        fired_at: position of the last *notified* firing (for the cooldown).
        notified_at: position of the last notification of this firing (for reminders).
        held_back: this firing is held back by the cooldown and has not been notified.
        suppressed: firings dropped by the cooldown since the last notified one.
        value: the value the rule reported at the last true evaluation.
        message: the text the rule gave at the last true evaluation (used again when it resolves).
    """

    phase: Phase = "inactive"
    active_since: float | None = None
    clear_since: float | None = None
    fired_at: float | None = None
    notified_at: float | None = None
    held_back: bool = False
    suppressed: int = 0
    value: float | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlertState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Transition:
    """Something that happened to an alert at one evaluation.

    Attributes:
        kind: ``"pending"``, ``"firing"``, ``"resolved"`` or ``"reminder"`` (still firing, notified again).
        notify: whether the delivery channels are told (``False`` when the cooldown holds it back).
        suppressed: on a notified firing, how many firings the cooldown dropped before it.
        late: a firing notified after the cooldown held it back (it began earlier).
    """

    kind: TransitionKind
    notify: bool = True
    suppressed: int = 0
    late: bool = False


def advance(
    state: AlertState,
    active: bool,
    at: float,
    timing: Timing,
    *,
    value: float | None = None,
    message: str | None = None,
) -> tuple[AlertState, list[Transition]]:
    """One evaluation of an alert: the condition is ``active`` (or not) at position ``at``.

    Args:
        state: the alert's state before this evaluation.
        active: whether the rule's condition holds now.
        at: the position now (a step or an examples count; never smaller than at the previous evaluation).
        timing: hold, clear, cooldown and reminder durations.
        value, message: what the rule reported (kept while the condition holds).

    Returns:
        The new state and what happened: usually nothing, at most one transition.
    """
    out: list[Transition] = []
    if active:
        state = replace(state, value=value, message=message if message is not None else state.message)
    if state.phase == "inactive":
        if not active:
            return state, out
        state = replace(state, phase="pending", active_since=at, clear_since=None)
        if timing.hold_for > 0:
            return state, [Transition("pending", notify=True)]
    if state.phase == "pending":
        if not active:  # gave up before firing: silently inactive again
            return replace(state, phase="inactive", active_since=None), out
        assert state.active_since is not None
        if at - state.active_since < timing.hold_for:
            return state, out
        return _fire(state, at, timing)
    # firing
    if active:
        state = replace(state, clear_since=None)
    else:
        clear_since = at if state.clear_since is None else state.clear_since
        state = replace(state, clear_since=clear_since)
        if at - clear_since >= timing.clear_for:
            notify = not state.held_back
            suppressed = state.suppressed + (1 if state.held_back else 0)
            resolved = replace(
                state,
                phase="inactive",
                active_since=None,
                clear_since=None,
                notified_at=None,
                held_back=False,
                suppressed=suppressed,
            )
            return resolved, [Transition("resolved", notify=notify)]
    if state.held_back:
        assert state.fired_at is not None
        if at - state.fired_at >= timing.cooldown:  # the cooldown is over and it still fires: tell now
            return _notified_firing(state, at, late=True)
        return state, out
    assert state.notified_at is not None
    if timing.repeat_every is not None and at - state.notified_at >= timing.repeat_every:
        return replace(state, notified_at=at), [Transition("reminder", notify=True)]
    return state, out


def _fire(state: AlertState, at: float, timing: Timing) -> tuple[AlertState, list[Transition]]:
    state = replace(state, phase="firing", clear_since=None)
    if state.fired_at is not None and at - state.fired_at < timing.cooldown:
        return replace(state, held_back=True), [Transition("firing", notify=False)]
    return _notified_firing(state, at, late=False)


def _notified_firing(state: AlertState, at: float, *, late: bool) -> tuple[AlertState, list[Transition]]:
    transition = Transition("firing", notify=True, suppressed=state.suppressed, late=late)
    return replace(state, fired_at=at, notified_at=at, held_back=False, suppressed=0), [transition]
