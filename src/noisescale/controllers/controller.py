"""``BatchSizeController``: the pure controller with its state, applied to an optimizer, a sampler and a clock."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from noisescale.controllers.apply import OptimizerScaling, check_horizon_names, check_horizons
from noisescale.controllers.clock import ExampleClock
from noisescale.controllers.config import ControllerConfig, PolicyName, Stall
from noisescale.controllers.grid import Quantize
from noisescale.controllers.rules import LrRule, lr_scale
from noisescale.controllers.sampler import AdaptiveBatchSampler
from noisescale.controllers.state import ControllerState, Decision
from noisescale.errors import ConfigError

__all__ = ["BatchSizeController"]

_WRAPPER_VERSION = 1


class BatchSizeController:
    """Chooses the batch size (and the learning-rate multiplier) from the measured noise scale, step by step.

    Call ``step(m)`` with each measurement, after ``monitor.step()`` and before ``optimizer.step()``::

        ctrl = ns.BatchSizeController(policy="gns", min_batch=32, max_batch=1024, lr_rule="linear",
                                      optimizer=optimizer, sampler=sampler, run=run)
        for indices in sampler:                      # ctrl sets sampler.batch_size
            ...backward...
            m = monitor.step(batch_size=len(indices) * world_size)
            decision = ctrl.step(m)                  # the next batch; this step's learning-rate multiplier
            optimizer.step()                         # runs with lr x decision.lr_scale, then the lr is put back

    The decisions come from the pure ``ControllerConfig.init``/``update`` (``noisescale.controllers``); this
    wrapper keeps the state and applies each decision in one place: ``sampler.batch_size``, ``accumulation``
    for loops with a fixed micro-batch, the learning rate (and the horizons) for the length of
    ``optimizer.step()`` only, ``clock`` set to the examples seen.  A change is recorded as an event (kind
    ``"controller"``) on ``run``, and ``lr``, ``lr_scale`` and ``accumulation`` are logged each step.

    Args:
        policy: ``"gns"`` (follow ``k x B_simple``), or a fixed schedule for comparison: ``"constant"``,
            ``"step"`` (``milestones``), ``"linear_ramp"`` (``ramp_to`` over ``ramp_examples``).
        batch_size: the starting batch (all micro-batches, all ranks); default ``min_batch`` for ``gns``.
        min_batch, max_batch: bounds (``gns`` needs ``max_batch``).
        quantize: allowed sizes, ``"multiple"`` of ``micro_batch x world_size`` or ``"pow2"``.
        micro_batch: examples per backward pass on one rank, for loops that accumulate gradients
            (``accumulation`` is then ``batch / (micro_batch x world_size)``).
        world_size: data-parallel ranks (default: the sampler's, else 1).
        k: the ``gns`` target is ``k x B_simple``.
        power: with ``power < 1`` the target is ``k x B_simple^power x base_batch^(1 - power)``: it grows more
            slowly than the noise scale (0.5: its square root).
        hysteresis: the batch moves only when ``k`` times the band's near edge is outside
            ``[B / (1 + hysteresis), B (1 + hysteresis)]``.
        dwell: examples at least between two changes (and before the first).
        max_factor: largest change per decision.
        monotonic: never lower the batch (a pure batch-size warm-up).
        use_band: read the band's edges (not only the point) so a noisy estimate does not flap.
        signal: the measurement attribute to follow (its band: ``<signal>_low``, ``<signal>_high``).
        milestones: ``((examples, batch), ...)`` for ``"step"``.
        ramp_to, ramp_examples: for ``"linear_ramp"``, from ``batch_size``.
        lr_rule: ``"none"``, ``"linear"``, ``"sqrt"``, ``"adascale"`` (see ``noisescale.controllers.rules``).
        base_batch: the batch your learning rate is tuned for (default: ``batch_size``).
        stall: a ``noisescale.controllers.Stall`` response, off by default.
        optimizer: the optimizer whose learning rate is scaled around each ``step()``; ``"later"`` when a framework
            creates it after the controller (a framework callback then calls ``attach()`` when training starts).
        base_lr: with no optimizer, the learning rate ``decision.lr`` scales (you apply it).
        keep_horizons: some of ``"momentum"`` (SGD momentum, Adam's beta1), ``"beta2"``, ``"weight_decay"``:
            keep their timescales constant in examples when the batch changes.
        sampler: an ``AdaptiveBatchSampler`` whose ``batch_size`` follows the decisions.
        clock: an ``ExampleClock`` set to the examples of each measurement.
        run: where decisions go: anything with ``event(kind, message, step=, data=)`` and optionally
            ``log(step, metrics)`` (an ``ns.Run``).

    Raises:
        ConfigError: at construction, for any bad or inconsistent option, naming the fix.
    """

    def __init__(
        self,
        policy: PolicyName = "gns",
        *,
        batch_size: int | None = None,
        min_batch: int | None = None,
        max_batch: int | None = None,
        quantize: Quantize = "multiple",
        micro_batch: int | None = None,
        world_size: int | None = None,
        k: float = 1.0,
        power: float = 1.0,
        hysteresis: float = 0.25,
        dwell: int = 0,
        max_factor: float = 2.0,
        monotonic: bool = False,
        use_band: bool = True,
        signal: str = "b_simple",
        milestones: Sequence[tuple[int, int]] = (),
        ramp_to: int | None = None,
        ramp_examples: int | None = None,
        lr_rule: LrRule = "none",
        base_batch: int | None = None,
        stall: Stall | None = None,
        optimizer: Any = None,
        base_lr: float | None = None,
        keep_horizons: Sequence[str] = (),
        sampler: AdaptiveBatchSampler | None = None,
        clock: ExampleClock | None = None,
        run: Any = None,
    ) -> None:
        if sampler is not None and not isinstance(sampler, AdaptiveBatchSampler):
            raise ConfigError(f"sampler must be an ns.AdaptiveBatchSampler, got {type(sampler).__name__}")
        if world_size is None:
            world_size = sampler.num_replicas if sampler is not None else 1
        elif sampler is not None and sampler.num_replicas != world_size:
            raise ConfigError(f"world_size={world_size} but the sampler shards over {sampler.num_replicas} ranks")
        if stall is not None and not isinstance(stall, Stall):
            raise ConfigError(f"stall must be a noisescale.controllers.Stall(...), got {type(stall).__name__}")
        self.config = ControllerConfig(
            policy=policy,
            batch_size=batch_size,
            min_batch=min_batch,
            max_batch=max_batch,
            quantize=quantize,
            micro_batch=micro_batch,
            world_size=world_size,
            k=k,
            power=power,
            hysteresis=hysteresis,
            dwell=dwell,
            max_factor=max_factor,
            monotonic=monotonic,
            use_band=use_band,
            signal=signal,
            milestones=tuple(tuple(p) for p in milestones),  # type: ignore[misc]
            ramp_to=ramp_to,
            ramp_examples=ramp_examples,
            lr_rule=lr_rule,
            base_batch=base_batch,
            stall=stall,
        )
        if base_lr is not None and (
            isinstance(base_lr, bool)
            or not isinstance(base_lr, (int, float))
            or not math.isfinite(base_lr)
            or base_lr <= 0
        ):
            raise ConfigError(f"base_lr must be a positive learning rate, got {base_lr!r}")
        later = isinstance(optimizer, str) and optimizer == "later"
        if isinstance(optimizer, str) and not later:
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer or 'later', got {optimizer!r}")
        if later:
            optimizer = None
            if base_lr is not None:
                raise ConfigError("pass optimizer='later' or base_lr=, not both: the attached optimizer's lr is scaled")
        if lr_rule != "none" and optimizer is None and base_lr is None and not later:
            raise ConfigError(
                f"lr_rule={lr_rule!r} scales a learning rate, but none was given: pass optimizer=your_optimizer "
                "(its learning rate is multiplied for each optimizer.step()), or base_lr=... to read decision "
                "learning rates from ctrl.lr, or lr_rule='none'"
            )
        if optimizer is not None and base_lr is not None:
            raise ConfigError("pass optimizer= or base_lr=, not both: an optimizer's own learning rate is scaled")
        keep = check_horizon_names(keep_horizons) if later else check_horizons(optimizer, keep_horizons)
        if sampler is not None and self.config.grid.high > sampler.n:
            raise ConfigError(
                f"max_batch={self.config.grid.high} is larger than the sampler's dataset ({sampler.n:,} examples); "
                f"use max_batch <= {sampler.n}"
            )
        if clock is not None and not isinstance(clock, ExampleClock):
            raise ConfigError(f"clock must be an ns.ExampleClock, got {type(clock).__name__}")
        if run is not None and not callable(getattr(run, "event", None)):
            raise ConfigError(
                f"run must have an event(kind, message, step=, data=) method (an ns.Run), got {type(run).__name__}"
            )
        self.awaits_optimizer = later
        self._keep = keep
        self.base_lr = None if base_lr is None else float(base_lr)
        self.sampler, self.clock, self.run = sampler, clock, run
        self._log = getattr(run, "log", None) if run is not None else None
        self.state: ControllerState = self.config.init()
        self.decision: Decision | None = None
        self._lr_step = 0
        self._scaling = OptimizerScaling(optimizer, keep, on_lr=self._log_lr) if optimizer is not None else None
        self._apply(self._scale_now(), self.state.batch_size)

    def attach(self, optimizer: Any = None, *, run: Any = None) -> None:
        """Give a controller built with ``optimizer="later"`` its optimizer (and, if it has none, a run).

        For framework callbacks, which see the optimizer only once training starts.  The learning rate of every
        ``optimizer.step()`` from now on is scaled, as if the optimizer had been passed at construction.

        Args:
            optimizer: the ``torch.optim.Optimizer`` that trains (not a wrapper around it).
            run: where decisions go, when the controller was built without ``run=``.

        Raises:
            ConfigError: the controller was not built with ``optimizer="later"``, already has its optimizer or run,
                or ``keep_horizons`` find nothing to keep in this optimizer.
        """
        if optimizer is not None:
            if not self.awaits_optimizer:
                raise ConfigError(
                    "this controller was built with an optimizer (or none to scale): build it with optimizer='later' "
                    "for a framework to attach its optimizer"
                )
            keep = check_horizons(optimizer, self._keep)
            self._scaling = OptimizerScaling(optimizer, keep, on_lr=self._log_lr)
            self.awaits_optimizer = False
            self._apply(self._lr_scale, self.state.batch_size)
        if run is not None:
            if self.run is not None:
                raise ConfigError("this controller already has a run: build it without run= to attach one")
            if not callable(getattr(run, "event", None)):
                raise ConfigError(
                    f"run must have an event(kind, message, step=, data=) method, got {type(run).__name__}"
                )
            self.run = run
            self._log = getattr(run, "log", None)

    # -- what the loop reads -----------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """The batch for the next step (all micro-batches, all ranks)."""
        return self.state.batch_size

    @property
    def accumulation(self) -> int | None:
        """Backward passes per optimizer step on each rank for the next batch (``None`` without micro_batch)."""
        return self.config.accumulation(self.state.batch_size)

    @property
    def optimizer(self) -> Any:
        """The optimizer whose learning rate is scaled (``None`` without one, or until one is attached)."""
        return self._scaling.optimizer if self._scaling is not None else None

    @property
    def lr_scale(self) -> float:
        """The multiplier the coming ``optimizer.step()`` applies (to the gradient just measured)."""
        return self._scaling.lr_scale if self._scaling is not None else self._lr_scale

    @property
    def lr(self) -> float | None:
        """The learning rate of the coming ``optimizer.step()`` (first parameter group, or ``base_lr``), scaled."""
        if self._scaling is not None:
            return float(self._scaling.optimizer.param_groups[0]["lr"]) * self.lr_scale
        return None if self.base_lr is None else self.base_lr * self.lr_scale

    # -- one step ----------------------------------------------------------------------------------------------

    def step(self, m: Any, *, loss: Any = None) -> Decision:
        """Read this step's measurement, decide, apply; returns the ``Decision``.

        Args:
            m: the ``Measurement`` of the step just computed (or any object with ``status``, ``step``,
                ``examples`` and the signal attributes; an ``ExampleClock`` for the fixed schedules).
            loss: the step's training loss, needed with a stall response (a number or a one-element tensor,
                read here: one device sync).  Under DDP pass the same value on every rank (e.g. all-reduced).
        """
        if self.awaits_optimizer:
            raise ConfigError(
                "this controller was built with optimizer='later' and no optimizer was attached: pass it to a "
                "framework callback (controller=...), which attaches the trainer's optimizer, or call "
                "ctrl.attach(optimizer) before the first step"
            )
        before = self.state
        decision, self.state = self.config.update(m, before, loss=None if loss is None else float(loss))
        self.decision = decision
        self._apply(decision.lr_scale, decision.batch_before, next_batch=decision.batch_size)
        if self.clock is not None:
            self.clock.set(examples=decision.examples, step=decision.step)
        if decision.changed and self.run is not None:
            self.run.event("controller", decision.reason, step=decision.step, data=self._event_data(m, decision))
        if self._log is not None:
            metrics: dict[str, float] = {"lr_scale": decision.lr_scale}
            if decision.accumulation is not None:
                metrics["accumulation"] = float(self.config.accumulation(decision.batch_before) or 0)
            if self._scaling is None and self.base_lr is not None:
                metrics["lr"] = self.base_lr * decision.lr_scale
            self._log(decision.step, metrics)
        self._lr_step = decision.step
        return decision

    def _scale_now(self) -> float:
        s = self.state
        return lr_scale(self.config.lr_rule, s.batch_size, self.config.reference_batch, s.signal) * s.stall_lr

    def _apply(self, scale: float, gradient_batch: int, *, next_batch: int | None = None) -> None:
        self._lr_scale = scale
        if self._scaling is not None:
            ref = self.config.reference_batch
            upcoming = gradient_batch if next_batch is None else next_batch
            self._scaling.set(scale, gradient_batch / ref, upcoming / ref)
        if self.sampler is not None:
            self.sampler.batch_size = gradient_batch if next_batch is None else next_batch

    def _log_lr(self, lr: float) -> None:
        if self._log is not None and self._lr_step > 0:
            self._log(self._lr_step, {"lr": lr})

    def _event_data(self, m: Any, d: Decision) -> dict[str, Any]:
        cfg = self.config
        data: dict[str, Any] = {
            "policy": d.policy,
            "before": {
                "batch_size": d.batch_before,
                "accumulation": cfg.accumulation(d.batch_before),
                "lr_scale": d.lr_scale,
            },
            "after": {"batch_size": d.batch_size, "accumulation": d.accumulation, "lr_scale": d.next_lr_scale},
            "b_simple": getattr(m, "b_simple", None),
            "b_simple_low": getattr(m, "b_simple_low", None),
            "b_simple_high": getattr(m, "b_simple_high", None),
            "examples": d.examples,
        }
        if cfg.signal != "b_simple":
            data.update(signal=cfg.signal, signal_value=d.signal, signal_low=d.signal_low, signal_high=d.signal_high)
        if d.stall is not None:
            data["stall"] = d.stall
        return data

    # -- saving and closing ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _WRAPPER_VERSION,
            "policy": self.config.policy,
            "state": self.state.to_dict(),
            "decision": None if self.decision is None else dataclasses.asdict(self.decision),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved ``state_dict()``; the sampler's batch and the multiplier are set from it.

        Raises:
            ConfigError: a state of another version or policy, or a batch this configuration does not allow.
        """
        if not isinstance(state, dict) or state.get("version") != _WRAPPER_VERSION:
            raise ConfigError(f"not a BatchSizeController state of version {_WRAPPER_VERSION}: {state!r:.200}")
        if state.get("policy") != self.config.policy:
            raise ConfigError(
                f"the saved controller ran policy {state.get('policy')!r}, this one {self.config.policy!r}: "
                "construct it with the same policy"
            )
        s = ControllerState.from_dict(state["state"])
        self.config.grid.check("the saved batch_size", s.batch_size)
        self.state = s
        d = state.get("decision")
        self.decision = Decision(**d) if d is not None else None
        self._lr_step = s.step
        self._apply(self._scale_now(), s.batch_size)

    def close(self) -> None:
        """Remove the optimizer hooks."""
        if self._scaling is not None:
            self._scaling.close()

    def __enter__(self) -> BatchSizeController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BatchSizeController(policy={self.config.policy!r}, batch_size={self.batch_size}, "
            f"lr_scale={self.lr_scale:.4g}, changes={self.state.changes})"
        )
