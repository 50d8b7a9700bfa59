"""The pure controller, optax-style: ``init(config) -> state`` and ``update(config, m, state) -> (decision, state)``.

``m`` is read through plain attributes only (``status``, ``step``, ``examples`` and the signal with its band,
``b_simple``, ``b_simple_low``, ``b_simple_high`` by default), so a ``noisescale.Measurement``, a scripted
stand-in, or an ``ExampleClock`` (for the schedules, which need no measurement) all work.  A measurement whose
status is not ``"ok"``, or whose signal is undefined, returns the state unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from noisescale.controllers.rules import lr_scale
from noisescale.controllers.state import ControllerState, Decision, StallEvent
from noisescale.errors import ConfigError

if TYPE_CHECKING:
    from noisescale.controllers.config import ControllerConfig

__all__ = ["init", "update"]


def init(config: ControllerConfig) -> ControllerState:
    """The state before the first step: the configured starting batch, nothing measured yet."""
    assert config.batch_size is not None
    return ControllerState(batch_size=config.batch_size)


def update(
    config: ControllerConfig, m: Any, state: ControllerState, *, loss: float | None = None
) -> tuple[Decision, ControllerState]:
    """Read one measurement and decide the next batch (and this step's learning-rate multiplier).

    Args:
        config: what the controller does.
        m: this step's measurement (see the module docstring for what is read).
        state: the state returned by the previous call (or ``init``).
        loss: this step's training loss (needed with a stall response, equal on every rank under DDP).

    Raises:
        ConfigError: the policy reads a signal the measurement does not have, or a stall response has no loss.
    """
    step, examples = int(m.step), int(m.examples)
    cur = state.batch_size
    status = getattr(m, "status", "ok")
    b, lo, hi = _signal(config, m)
    if status != "ok":
        why = getattr(m, "undefined_reason", None)
        return _hold(
            config,
            state,
            step,
            examples,
            f"held at {cur}: the measurement is {status}" + (f" ({why})" if why else ""),
            b,
            lo,
            hi,
        ), state
    if config.policy == "gns" and (b is None or not math.isfinite(b)):
        return _hold(config, state, step, examples, f"held at {cur}: no finite {config.signal} yet", b, lo, hi), state

    new = dataclasses.replace(state, step=step, examples=examples)
    if b is not None and math.isfinite(b):
        new = dataclasses.replace(new, signal=b, signal_low=lo, signal_high=hi)
    stall = config.stall
    target, reason, stall_event = cur, "", None
    if stall is not None:
        if loss is None:
            raise ConfigError("a stall response watches the loss: pass it with every measurement, step(m, loss=loss)")
        new, target, reason, stall_event = _stall(config, new, cur, float(loss), b)
    if stall_event is None and new.stall_until is None:
        if config.policy == "gns":
            assert b is not None
            target, reason = _gns(config, new, cur, b, lo, hi)
        else:
            target, reason = _schedule(config, cur, examples)
    changed = target != cur or stall_event is not None
    if target != cur:
        new = dataclasses.replace(new, batch_size=target, changed_at=examples, changes=new.changes + 1)
    decision = Decision(
        step=step,
        examples=examples,
        batch_size=target,
        accumulation=config.accumulation(target),
        lr_scale=_lr(config, cur, state.signal if b is None else b) * state.stall_lr,
        next_lr_scale=_lr(config, target, new.signal) * new.stall_lr,
        batch_before=cur,
        changed=changed,
        reason=reason or f"held at {cur}",
        policy=config.policy,
        signal=b,
        signal_low=lo,
        signal_high=hi,
        stall=stall_event or ("active" if new.stall_until is not None else None),
    )
    return decision, new


def _signal(config: ControllerConfig, m: Any) -> tuple[float | None, float | None, float | None]:
    name = config.signal
    if not hasattr(m, name):
        if config.policy != "gns":
            return None, None, None
        raise ConfigError(
            f"policy='gns' reads the signal {name!r}, which the measurement ({type(m).__name__}) does not have: "
            "pass signal='b_simple', or a signal the monitor reports"
        )
    b = getattr(m, name)
    lo, hi = getattr(m, f"{name}_low", None), getattr(m, f"{name}_high", None)
    return b, (b if lo is None else lo), (b if hi is None else hi)


def _lr(config: ControllerConfig, batch: int, b: float | None) -> float:
    return lr_scale(config.lr_rule, batch, config.reference_batch, b)


def _hold(
    config: ControllerConfig,
    state: ControllerState,
    step: int,
    examples: int,
    reason: str,
    b: float | None,
    lo: float | None,
    hi: float | None,
) -> Decision:
    cur = state.batch_size
    scale = _lr(config, cur, state.signal) * state.stall_lr
    return Decision(
        step=step,
        examples=examples,
        batch_size=cur,
        accumulation=config.accumulation(cur),
        lr_scale=scale,
        next_lr_scale=scale,
        batch_before=cur,
        changed=False,
        reason=reason,
        policy=config.policy,
        signal=b,
        signal_low=lo,
        signal_high=hi,
    )


def _g(v: float | None) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.4g}")


def _gns(
    config: ControllerConfig, state: ControllerState, cur: int, b: float, lo: float | None, hi: float | None
) -> tuple[int, str]:
    """Target ``config.target(B_simple)``, moved only when the band's near edge leaves the hysteresis band around
    the batch, by ``max_factor`` at most, after the dwell; ``monotonic`` never lowers."""
    grid, h = config.grid, config.hysteresis
    lo_v = lo if config.use_band and lo is not None else b
    hi_v = hi if config.use_band and hi is not None else b
    target = config.target(b)
    what = f"{config.signal} {_g(b)}" + (f" [{_g(lo_v)}, {_g(hi_v)}]" if config.use_band else "")
    new, direction = cur, ""
    if config.target(lo_v) > cur * (1 + h) and cur < grid.high:
        new = min(grid.nearest(target), grid.floor(cur * config.max_factor))
        direction = "above"
    elif not config.monotonic and config.target(hi_v) < cur / (1 + h) and cur > grid.low:
        new = max(grid.nearest(target), grid.ceil(cur / config.max_factor))
        direction = "below"
    if new == cur:
        return cur, f"held at {cur}: the target for {what} is {_g(target)}, within the {h:.0%} hysteresis or the bounds"
    since = state.examples - state.changed_at
    if since < config.dwell:
        return cur, (
            f"held at {cur}: the target {new} waits for the dwell ({since:,} of {config.dwell:,} examples since the "
            "last change)"
        )
    edge = ("its low edge" if direction == "above" else "its high edge") if config.use_band else "it"
    return new, (
        f"the target for {what} is {_g(target)}, {direction} batch {cur} ({edge} clears the {h:.0%} hysteresis): "
        f"batch {cur} -> {new}"
    )


def _schedule(config: ControllerConfig, cur: int, examples: int) -> tuple[int, str]:
    assert config.batch_size is not None
    if config.policy == "constant":
        return config.batch_size, f"constant batch {config.batch_size}"
    if config.policy == "step":
        new, at = config.batch_size, 0
        for point, batch in config.milestones:
            if examples >= point:
                new, at = batch, point
        if new == cur:
            return cur, f"step schedule: batch {cur}"
        return new, f"step schedule: {examples:,} examples passed the milestone at {at:,}: batch {cur} -> {new}"
    assert config.ramp_to is not None and config.ramp_examples is not None
    frac = min(1.0, examples / config.ramp_examples)
    new = config.grid.nearest(config.batch_size + (config.ramp_to - config.batch_size) * frac)
    if new == cur:
        return cur, f"linear ramp: batch {cur}"
    return new, f"linear ramp at {examples:,} of {config.ramp_examples:,} examples: batch {cur} -> {new}"


def _stall(
    config: ControllerConfig, state: ControllerState, cur: int, loss: float, b: float | None
) -> tuple[ControllerState, int, str, StallEvent | None]:
    """The stall response: returns ``(state, batch, reason, "started" | "ended" | None)``."""
    stall = config.stall
    assert stall is not None
    examples = state.examples
    if not math.isfinite(loss):
        return state, cur, "", None
    if stall.loss_halflife is None:
        avg_raw, weight = loss, 1.0
    else:
        decay = 0.5 ** (cur / stall.loss_halflife)
        avg_raw = decay * (state.loss_avg or 0.0) + (1 - decay) * loss
        weight = decay * state.loss_weight + (1 - decay)
    state = dataclasses.replace(state, loss_avg=avg_raw, loss_weight=weight)
    avg = avg_raw / weight
    if state.stall_until is not None:
        if examples < state.stall_until:
            return state, cur, f"stall response: held at {cur} until {state.stall_until:,} examples", None
        back = state.stall_batch if state.stall_batch is not None else cur
        state = dataclasses.replace(
            state, stall_until=None, stall_batch=None, stall_lr=1.0, best_loss=avg, best_at=examples
        )
        return state, back, f"stall response over after {stall.duration:,} examples: back to batch {back}", "ended"
    if state.best_loss is None or avg < state.best_loss * (1 - stall.min_improvement):
        return dataclasses.replace(state, best_loss=avg, best_at=examples), cur, "", None
    since = examples - state.best_at
    low_noise = b is not None and b <= stall.noise_below * cur
    if since < stall.patience or not low_noise or state.stalls >= stall.max_responses:
        return state, cur, "", None
    why = (
        f"loss {avg:.4g} has not improved by {stall.min_improvement:.0%} on its best {state.best_loss:.4g} for "
        f"{since:,} examples while {config.signal} {_g(b)} <= {stall.noise_below:g} x batch {cur}"
    )
    until = examples + stall.duration
    if stall.action == "raise_lr":
        state = dataclasses.replace(
            state, stall_until=until, stall_batch=cur, stall_lr=stall.factor, stalls=state.stalls + 1
        )
        return state, cur, f"{why}: learning rate x{stall.factor:g} until {until:,} examples", "started"
    lower = config.grid.floor(cur / stall.factor)
    if lower >= cur:
        return state, cur, "", None  # already at min_batch: nothing to lower
    state = dataclasses.replace(state, stall_until=until, stall_batch=cur, stalls=state.stalls + 1)
    return state, lower, f"{why}: batch {cur} -> {lower} until {until:,} examples", "started"
