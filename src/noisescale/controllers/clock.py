"""``ExampleClock``: training time counted in examples, so schedules survive batch-size changes.

A warm-up of 1,000 optimizer steps is 32,000 examples at batch 32 and 256,000 at batch 256: when a controller
changes the batch, a schedule counted in steps stretches or shrinks.  Counted in examples it does not.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from noisescale.errors import ConfigError

__all__ = ["ExampleClock"]

Decay = Literal["constant", "linear", "cosine"]
_STATE_VERSION = 1


class ExampleClock:
    """Counts examples and optimizer steps, and gives a learning-rate factor as a function of examples seen.

    The factor rises linearly from ``start`` to 1 over ``warmup`` examples, then follows ``decay`` down to
    ``final`` at ``total`` examples: ``"constant"`` stays at 1 until a linear ``cooldown`` over the last
    ``cooldown`` examples (warm-up, stable, decay), ``"linear"`` and ``"cosine"`` fall from the end of the warm-up.
    After ``total`` it stays at ``final``.

    Use it as the function of ``torch.optim.lr_scheduler.LambdaLR`` (the scheduler's step count is ignored) and
    advance it once per optimizer step, with ``tick(batch_size)`` or, when a ``BatchSizeController`` has it as
    ``clock=``, from each measurement::

        clock = ns.ExampleClock(warmup=20_000, total=2_000_000, decay="cosine")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, clock)
        ...
        optimizer.step(); clock.tick(len(batch)); scheduler.step()

    It also stands in for a measurement in the fixed schedules (``status``, ``step``, ``examples``).

    Args:
        warmup: examples of the linear warm-up (0: none).
        total: examples at which the decay ends (needed for ``"linear"``, ``"cosine"`` and a ``cooldown``).
        decay: ``"constant"``, ``"linear"`` or ``"cosine"``.
        cooldown: with ``decay="constant"``, examples of the final linear decay.
        final: the factor at ``total``.
        start: the factor at 0 examples.

    Raises:
        ConfigError: a negative length, a decay without ``total``, phases longer than ``total``.
    """

    status = "ok"

    def __init__(
        self,
        *,
        warmup: int = 0,
        total: int | None = None,
        decay: Decay = "constant",
        cooldown: int = 0,
        final: float = 0.0,
        start: float = 0.0,
    ) -> None:
        for name, v in (("warmup", warmup), ("cooldown", cooldown)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a number of examples >= 0, got {v!r}")
        if decay not in ("constant", "linear", "cosine"):
            raise ConfigError(f"decay must be 'constant', 'linear' or 'cosine', got {decay!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
            raise ConfigError(f"total must be a positive number of examples or None, got {total!r}")
        if total is None and (decay != "constant" or cooldown):
            raise ConfigError(
                f"decay={decay!r}"
                + (f" with cooldown={cooldown}" if cooldown else "")
                + " needs total=... (the examples at which the decay ends)"
            )
        if cooldown and decay != "constant":
            raise ConfigError(f"cooldown is for decay='constant' (warm-up, stable, cool-down), not {decay!r}")
        if total is not None and warmup + cooldown > total:
            raise ConfigError(f"warmup + cooldown = {warmup + cooldown:,} examples is more than total={total:,}")
        for name, f in (("final", final), ("start", start)):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and f >= 0):
                raise ConfigError(f"{name} must be a factor >= 0, got {f!r}")
        self.warmup, self.total, self.decay, self.cooldown = warmup, total, decay, cooldown
        self.final, self.start = float(final), float(start)
        self.examples = 0
        self.step = 0
        self.batch_size = 0

    def tick(self, batch_size: int) -> None:
        """One optimizer step of ``batch_size`` examples (all micro-batches, all ranks) is done."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.examples += batch_size
        self.step += 1
        self.batch_size = batch_size

    def set(self, *, examples: int, step: int) -> None:
        """Set the count (from a measurement: ``m.examples``, ``m.step``); setting twice counts nothing twice."""
        if examples < self.examples:
            raise ConfigError(f"the clock cannot go back: at {self.examples:,} examples, asked for {examples:,}")
        if step > self.step:
            self.batch_size = (examples - self.examples) // (step - self.step)
        self.examples, self.step = int(examples), int(step)

    def factor(self, examples: int | None = None) -> float:
        """The learning-rate factor at ``examples`` (default: now)."""
        e = self.examples if examples is None else examples
        if self.warmup and e < self.warmup:
            return self.start + (1.0 - self.start) * e / self.warmup
        if self.total is None:
            return 1.0
        if e >= self.total:
            return self.final
        if self.decay == "constant":
            begin = self.total - self.cooldown
            if e < begin:
                return 1.0
            frac = (e - begin) / self.cooldown
        else:
            frac = (e - self.warmup) / max(1, self.total - self.warmup)
        if self.decay == "cosine":
            return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0 + (self.final - 1.0) * frac

    def __call__(self, _step: int = 0) -> float:
        """``factor()`` now: the function for ``LambdaLR`` (whose step count is ignored)."""
        return self.factor()

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "examples": self.examples, "step": self.step, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"not an ExampleClock state of version {_STATE_VERSION}: {state!r:.200}")
        self.examples, self.step, self.batch_size = int(state["examples"]), int(state["step"]), int(state["batch_size"])

    def __repr__(self) -> str:
        return f"ExampleClock(examples={self.examples:,}, step={self.step}, factor={self.factor():.4g})"
