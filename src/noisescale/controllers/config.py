"""The controller's configuration: one frozen dataclass, checked completely at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from noisescale.controllers import policy
from noisescale.controllers.grid import Grid, Quantize
from noisescale.controllers.rules import LR_RULES, LrRule
from noisescale.controllers.state import ControllerState, Decision
from noisescale.errors import ConfigError

__all__ = ["POLICIES", "ControllerConfig", "PolicyName", "Stall"]

PolicyName = Literal["gns", "constant", "step", "linear_ramp"]
POLICIES: tuple[PolicyName, ...] = ("gns", "constant", "step", "linear_ramp")
StallAction = Literal["lower_batch", "raise_lr"]


def _int(name: str, v: object, *, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def _num(name: str, v: object, *, low: float, strict: bool = False, hint: str = "") -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        if v > low or (v == low and not strict):
            return float(v)
    rel = ">" if strict else ">="
    raise ConfigError(f"{name} must be a finite number {rel} {low:g}, got {v!r}{hint}")


@dataclass(frozen=True, kw_only=True)
class Stall:
    """The stall response: when the loss has stopped improving while the noise is low, lower the batch (or raise
    the learning rate) for a bounded number of examples, then return.  Off unless passed as ``stall=``.

    Args:
        patience: examples without an improvement of the (smoothed) loss before it counts as stalled.
        duration: examples the response lasts; then the batch and learning rate return to what they were.
        action: ``"lower_batch"`` (divide the batch by ``factor``, down to ``min_batch``) or ``"raise_lr"``
            (multiply the learning rate by ``factor``).
        factor: how much to lower the batch or raise the learning rate (> 1).
        min_improvement: a relative fall of the loss below its best that counts as progress.
        noise_below: the noise counts as low when ``B_simple <= noise_below x batch``: a larger batch would not
            help, so more noise (or a larger step) is what is left to try.
        max_responses: responses at most over the run.
        loss_halflife: half-life in examples of the loss average the stall is judged on (``None``: the loss as
            given, e.g. already averaged).
    """

    patience: int
    duration: int
    action: StallAction = "lower_batch"
    factor: float = 2.0
    min_improvement: float = 0.01
    noise_below: float = 1.0
    max_responses: int = 3
    loss_halflife: float | None = None

    def __post_init__(self) -> None:
        _int("stall patience (examples)", self.patience)
        _int("stall duration (examples)", self.duration)
        if self.action not in ("lower_batch", "raise_lr"):
            raise ConfigError(f"stall action must be 'lower_batch' or 'raise_lr', got {self.action!r}")
        _num("stall factor", self.factor, low=1.0, strict=True, hint=", e.g. 2.0")
        _num("stall min_improvement", self.min_improvement, low=0.0)
        _num("stall noise_below", self.noise_below, low=0.0, strict=True)
        _int("stall max_responses", self.max_responses)
        if self.loss_halflife is not None:
            _num("stall loss_halflife (examples)", self.loss_halflife, low=0.0, strict=True)


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """What a batch-size controller does.  See ``noisescale.BatchSizeController`` for every argument.

    Raises:
        ConfigError: an unknown policy, rule or mode; bounds in the wrong order; a batch the quantisation does not
            allow; a schedule without its points; each with what to pass instead.
    """

    policy: PolicyName = "gns"
    batch_size: int | None = None
    min_batch: int | None = None
    max_batch: int | None = None
    quantize: Quantize = "multiple"
    micro_batch: int | None = None
    world_size: int = 1
    k: float = 1.0
    power: float = 1.0
    hysteresis: float = 0.25
    dwell: int = 0
    max_factor: float = 2.0
    monotonic: bool = False
    use_band: bool = True
    signal: str = "b_simple"
    milestones: tuple[tuple[int, int], ...] = ()
    ramp_to: int | None = None
    ramp_examples: int | None = None
    lr_rule: LrRule = "none"
    base_batch: int | None = None
    stall: Stall | None = None
    grid: Grid = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; expected one of {list(POLICIES)}")
        if self.lr_rule not in LR_RULES:
            raise ConfigError(
                f"unknown lr_rule {self.lr_rule!r}; expected one of {list(LR_RULES)} "
                "('linear' for SGD, 'sqrt' for Adam, 'adascale' from the measured noise scale)"
            )
        _int("world_size", self.world_size)
        if self.micro_batch is not None:
            _int("micro_batch (examples per backward pass on one rank)", self.micro_batch)
        self._resolve_bounds()
        assert self.min_batch is not None and self.max_batch is not None and self.batch_size is not None
        object.__setattr__(
            self, "grid", Grid(self.min_batch, self.max_batch, (self.micro_batch or 1) * self.world_size, self.quantize)
        )
        self.grid.check("batch_size", self.batch_size)
        if self.base_batch is None:
            object.__setattr__(self, "base_batch", self.batch_size)
        _int("base_batch (the batch the learning rate is tuned for)", self.base_batch)
        _num("k", self.k, low=0.0, strict=True, hint=" (target batch = k x B_simple)")
        _num("power", self.power, low=0.0, strict=True, hint=" (1: the target is proportional to B_simple)")
        if self.power > 1.0:
            raise ConfigError(f"power must be in (0, 1], got {self.power!r}: 1 follows B_simple, 0.5 its square root")
        _num("hysteresis", self.hysteresis, low=0.0, hint=" (a relative band, e.g. 0.25)")
        _int("dwell (examples between changes)", self.dwell, low=0)
        _num("max_factor", self.max_factor, low=1.0, strict=True, hint=" (largest change per decision, e.g. 2.0)")
        if not isinstance(self.signal, str) or not self.signal.isidentifier():
            raise ConfigError(f"signal must name a measurement attribute such as 'b_simple', got {self.signal!r}")
        g = self.grid
        if self.policy == "gns" and g.low < g.high and g.above(g.low) > g.low * self.max_factor * (1 + 1e-12):
            raise ConfigError(
                f"max_factor={self.max_factor:g} cannot move the batch from {g.low} to the next allowed size "
                f"{g.above(g.low)} ({g.describe()}): use max_factor={g.above(g.low) / g.low:g} or more"
            )
        if self.policy == "step":
            self._check_milestones()
        elif self.milestones:
            raise ConfigError(f"milestones are for policy='step', not {self.policy!r}")
        if self.policy == "linear_ramp":
            if self.ramp_to is None or self.ramp_examples is None:
                raise ConfigError(
                    "policy='linear_ramp' needs ramp_to (the final batch) and ramp_examples (examples over which "
                    "it ramps from batch_size), e.g. ramp_to=256, ramp_examples=50_000"
                )
            g.check("ramp_to", _int("ramp_to", self.ramp_to))
            _int("ramp_examples", self.ramp_examples)
        elif self.ramp_to is not None or self.ramp_examples is not None:
            raise ConfigError(f"ramp_to/ramp_examples are for policy='linear_ramp', not {self.policy!r}")

    def _resolve_bounds(self) -> None:
        """Defaults: gns starts at ``min_batch`` (itself one micro-batch per rank unless given) and needs
        ``max_batch``; a schedule's bounds are its own smallest and largest batch."""
        for name in ("batch_size", "min_batch", "max_batch"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name))
        if self.policy == "gns":
            if self.max_batch is None:
                raise ConfigError(
                    "policy='gns' needs max_batch=..., the largest batch the run may use (memory, data, budget)"
                )
            if self.min_batch is None:
                object.__setattr__(self, "min_batch", self.batch_size or (self.micro_batch or 1) * self.world_size)
            if self.batch_size is None:
                object.__setattr__(self, "batch_size", self.min_batch)
            return
        if self.batch_size is None:
            raise ConfigError(f"policy={self.policy!r} needs batch_size=..., the batch it starts with")
        points = [self.batch_size]
        if self.policy == "step":
            points += [p[1] for p in self.milestones if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], int)]
        if self.policy == "linear_ramp" and isinstance(self.ramp_to, int):
            points.append(self.ramp_to)
        if self.min_batch is None:
            object.__setattr__(self, "min_batch", min(points))
        if self.max_batch is None:
            object.__setattr__(self, "max_batch", max(points))

    @property
    def reference_batch(self) -> int:
        """The batch the user's learning rate (and momentum, weight decay) is tuned for: ``lr_scale`` is 1 there."""
        assert self.base_batch is not None
        return self.base_batch

    def _check_milestones(self) -> None:
        if not self.milestones:
            raise ConfigError(
                "policy='step' needs milestones: ((examples, batch), ...), e.g. ((10_000, 64), (50_000, 128))"
            )
        last = 0
        for i, point in enumerate(self.milestones):
            if not (isinstance(point, tuple) and len(point) == 2):
                raise ConfigError(f"milestones[{i}] must be a pair (examples, batch), got {point!r}")
            at, b = point
            _int(f"milestones[{i}] examples", at)
            if at <= last:
                raise ConfigError(f"milestones must be in increasing order of examples, got {at} after {last}")
            self.grid.check(f"milestones[{i}] batch", _int(f"milestones[{i}] batch", b))
            last = at

    def target(self, b: float) -> float:
        """The ``gns`` target for a noise scale ``b``: ``k x b`` (``power=1``), or ``k x b^p x base_batch^(1-p)``.

        ``power < 1`` grows the batch more slowly than the noise scale.  For a fixed exchange rate between steps
        and examples, McCandlish et al.'s model (each stretch of training costs ``dS_min (1 + b/B)`` steps and
        ``b dS_min (1 + B/b)`` examples) is cheapest at ``B`` proportional to ``sqrt(b)``: ``power=0.5``.
        """
        if self.power == 1.0:
            return self.k * b
        return self.k * b**self.power * self.reference_batch ** (1.0 - self.power)

    def init(self) -> ControllerState:
        """The state before the first step (pure; see ``noisescale.controllers.policy.init``)."""
        return policy.init(self)

    def update(self, m: Any, state: ControllerState, *, loss: float | None = None) -> tuple[Decision, ControllerState]:
        """Decide after one measurement (pure; see ``noisescale.controllers.policy.update``)."""
        return policy.update(self, m, state, loss=loss)

    @property
    def accumulation_unit(self) -> int | None:
        """Examples of one accumulation step across all ranks (``micro_batch x world_size``), if set."""
        return None if self.micro_batch is None else self.micro_batch * self.world_size

    def accumulation(self, batch: int) -> int | None:
        """Backward passes per optimizer step on each rank for ``batch`` (``None`` without ``micro_batch``)."""
        unit = self.accumulation_unit
        return None if unit is None else batch // unit
