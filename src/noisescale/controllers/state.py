"""The controller's state and its decisions: frozen dataclasses of plain numbers, the state versioned."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from noisescale.errors import ConfigError

__all__ = ["STATE_VERSION", "ControllerState", "Decision", "StallEvent"]

STATE_VERSION = 1
StallEvent = Literal["started", "active", "ended"]


@dataclass(frozen=True, kw_only=True)
class ControllerState:
    """Everything a controller remembers between two measurements (the live hyperparameters among it).

    Attributes:
        version: layout version of this state (``STATE_VERSION``), checked when a saved state is loaded.
        batch_size: the batch in use now (all micro-batches, all ranks).
        step, examples: of the last measurement that was read.
        changed_at: examples seen when the batch last changed (0 at the start): the dwell counts from here.
        changes: batch changes so far.
        signal, signal_low, signal_high: the last usable noise scale and its band (``None`` before the first).
        loss_avg, loss_weight: the loss average the stall response watches (bias-corrected by ``loss_weight``).
        best_loss, best_at: the best average so far and the examples seen when it was reached.
        stall_until: while a stall response lasts, the examples count at which it ends; else ``None``.
        stall_batch: the batch to return to when it ends.
        stall_lr: the learning-rate factor of a ``raise_lr`` response (1 otherwise).
        stalls: stall responses so far.
    """

    version: int = STATE_VERSION
    batch_size: int
    step: int = 0
    examples: int = 0
    changed_at: int = 0
    changes: int = 0
    signal: float | None = None
    signal_low: float | None = None
    signal_high: float | None = None
    stall: StallEvent | None = None
    loss_avg: float | None = None
    loss_weight: float = 0.0
    best_loss: float | None = None
    best_at: int = 0
    stall_until: int | None = None
    stall_batch: int | None = None
    stall_lr: float = 1.0
    stalls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControllerState:
        """The state saved by ``to_dict``.

        Raises:
            ConfigError: a state from another layout version, or with missing or unknown fields.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a controller state must be a dict (from state_dict()), got {type(d).__name__}")
        version = d.get("version")
        if version != STATE_VERSION:
            raise ConfigError(
                f"controller state version {version!r} cannot be loaded by this noisescale (state version "
                f"{STATE_VERSION}); save it again with this version, or load it with the version that wrote it"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(d) - names, {"batch_size"} - set(d)
        if unknown or missing:
            raise ConfigError(f"not a controller state: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the controller decided after one measurement.

    Attributes:
        step, examples: of the measurement the decision follows.
        batch_size: the batch for the next step (all micro-batches, all ranks).
        accumulation: backward passes per optimizer step on each rank for that batch (``None`` without
            ``micro_batch``).
        lr_scale: the learning-rate multiplier for the optimizer step that follows this measurement, i.e. for the
            gradient just measured (at ``batch_before``).
        next_lr_scale: the multiplier the next batch will get (equal to ``lr_scale`` unless the batch changed).
        batch_before: the batch the measured gradient came from.
        changed: whether the batch (or a stall response) changed.
        reason: one sentence saying why.
        policy: the policy that decided.
        signal, signal_low, signal_high: the noise scale and band the decision read (``None`` if undefined).
        stall: ``"started"``, ``"active"`` or ``"ended"`` around a stall response, else ``None``.
    """

    step: int
    examples: int
    batch_size: int
    accumulation: int | None
    lr_scale: float
    next_lr_scale: float
    batch_before: int
    changed: bool
    reason: str
    policy: str
    signal: float | None = None
    signal_low: float | None = None
    signal_high: float | None = None
    stall: StallEvent | None = None
