"""``GNSMonitor``: the one stateful facade, collector -> estimator -> measurement -> sinks.

Usage, in any training loop: once per optimizer step, after its last backward pass and before the next step's
first one (clipping, unscaling or zeroing ``p.grad`` in between changes nothing measured)::

    monitor = ns.GNSMonitor(model)
    ...
    loss.backward()
    m = monitor.step(batch_size=len(x))
    m.b_simple, m.b_simple_low, m.b_simple_high
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from noisescale.cadence import PER_HALFLIFE, Cadence
from noisescale.collectors.base import BackwardWatch, Collector
from noisescale.collectors.big_batch import BigBatchCapture
from noisescale.collectors.example import Policy, Scope
from noisescale.distributed import CommHook, data_parallel_sync
from noisescale.errors import ConfigError, StepError
from noisescale.estimators.band import z_for
from noisescale.estimators.engine import StepEngine
from noisescale.estimators.rows import RowLayout
from noisescale.estimators.smoothing import decay_for
from noisescale.estimators.step import StepConstants
from noisescale.events import Event, Metrics, metric_values
from noisescale.grad_norms import grad_sq_norms, grad_sq_norms_host
from noisescale.group_stats import DEFAULT_MAX_GROUPS, DEFAULT_SCORE_EVERY, GroupStats
from noisescale.preconditioned_noise import PreconditionedNoise
from noisescale.sink import Sink
from noisescale.sink_queue import monitor_sinks
from noisescale.source_choice import Source, SourceChoice
from noisescale.stats import BigBatchNorms, ParamSums, SmallBatchStats
from noisescale.types import Measurement

if TYPE_CHECKING:
    from torch.amp import GradScaler

__all__ = ["GNSMonitor", "Source"]

_ARMED_LATE = (
    "This step follows one the cadence (every=, budget=) left out, whose monitor.step() armed the hooks for this "
    "one: a forward pass that ran before that call was not seen. Call monitor.step() before the next step's first "
    "forward pass"
)
_POLICIES = ("error", "warn", "ignore")
_SCOPES = ("all", "norm")
_STATE_VERSION = 3  # 2: the cadence (every=, budget=); 3: the preconditioned estimate; older states still load
DEFAULT_HALFLIFE_STEPS = 25
"""With ``halflife=None`` the half-life is this many steps of the first step's batch size (in examples)."""


class GNSMonitor:
    """Measures the gradient noise scale B_simple = tr(Sigma) / |G|^2 of a model while it trains.

    Small-batch statistics come from a collector (per-example norms, micro-batch norms), the big batch is the
    step's accumulated ``p.grad``; the unbiased two-batch estimator (McCandlish et al. 2018, App. A) turns them
    into ``|G|^2`` and ``tr(Sigma)``, which are smoothed separately (half-life in examples) and divided, with a
    Fieller band.  Gradients are measured as if ``p.grad`` held the mean gradient of the step, so B_simple does
    not depend on a mean or sum loss, on ``1/k`` accumulation scaling, or on a ``GradScaler``'s scale.

    Args:
        model: the model to measure.  Only parameters with ``requires_grad`` are measured.
        source: ``"example"`` (per-example norms through the rule registry); ``"microbatch"`` (one norm per
            backward pass; needs gradient accumulation with at least two micro-batches); under DDP, ``"rank"``
            (each rank's local gradient before DDP averages it, one dot product per parameter and step); or
            ``"auto"``: under DDP with two or more ranks ``"rank"`` right away; otherwise it watches the first
            step and keeps ``"microbatch"`` if it had two or more backward passes (almost free, every parameter
            measured), else ``"example"``, measuring the layers it can (``m.coverage``; one short warning names
            what is left out).  Under DDP and FSDP2 every source sums its statistics over the ranks once per
            step, and every rank gets the same measurement.  Per-example gradients need a loss that is a sum over
            independent examples: see ``loss_couples_examples``.
        per_layer: also estimate per parameter tensor and per module (``m.layers``, ``m.modules``).
        halflife: smoothing half-life counted in examples; ``None`` means 25 steps of the first batch size.
        confidence: nominal coverage of the band ``[b_simple_low, b_simple_high]``.
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any, so ``grad_sq`` and ``trace_cov`` are
            reported unscaled (B_simple is scale-free either way).  ``step()`` may come before or after
            ``scaler.unscale_(optimizer)``.
        on_unsupported: for the example source: ``"error"``, ``"warn"`` or ``"ignore"`` the trainable layers it
            cannot measure (no rule, tied weights, a refused first call or example count; see
            ``ExampleCollector``); ``m.coverage`` says what was measured.  ``None`` (default): ``"error"`` with
            ``source="example"``, and under ``"auto"`` the supported layers are measured with one short warning.
        loss_couples_examples: the loss couples the examples of a batch (a contrastive loss such as CLIP's,
            in-batch negatives), so per-example gradients are not those of independent examples and no layer
            hook can tell: the example source is refused and ``"auto"`` uses micro-batches or ranks.
        scope: ``"all"`` layers, or ``"norm"``: only normalisation layers (Gray et al. 2024), source ``example``.
        sinks: where every measurement, logged metric and event goes (``noisescale.sink.Sink``: the run store
            ``ns.Run``, ``ns.sinks.TensorBoard``, an alert engine, ...).  They are fed from one background thread,
            so a sink never makes the training step wait or synchronise the device; ``close()`` closes them.
        callbacks: functions called with every ``Measurement``, on the sinks' thread, once its numbers have been
            read (``CallbackSink``).
        run: a run store (``ns.Run``) receiving every measurement, like a sink that ``close()`` leaves open for
            its owner; any object with ``log_measurement(measurement)`` also works.
        comm_hook: for ``source="rank"``: ``(state, hook)``, a DDP communication hook to register on the model
            (registering it yourself works as well: the monitor does not use DDP's communication).
        max_groups: at most this many distinct ids in ``step(groups=...)`` over the run (docs/sources.md).
        score_every: with ``step(example_ids=...)``, keep per-example scores on every ``score_every``-th step.
        every: measure one step in ``every`` (steps 1, 1 + every, ...); the hooks are disarmed on the others,
            which cost a Python call per hook and nothing on the device.  An unmeasured step's ``Measurement``
            has status ``"unmeasured"`` and carries the last measurement's smoothed values and band; it does not
            reach the sinks.  The smoothing decays by the examples since the last measurement, so the half-life
            stays counted in examples.  Default 1: every step (see ``docs/performance.md`` for why).
        budget: instead of ``every``, the share of the training time the measurements may cost, e.g. ``0.03``:
            the monitor times its own cost and picks the cadence, denser while B_simple moves
            (``noisescale.cadence``); under DDP rank 0 decides for every rank.  Each chosen cadence is recorded
            as a ``"cadence"`` event.
        sketch: for the example source: estimate each example's squared norms from ``sketch`` random projections
            of the layer's inputs (or output gradients), drawn afresh each step, where that costs at most half the
            exact form: ``nn.Linear`` on sequences (``B T k (d_in + d_out)`` instead of the Gram or materialised
            forms), convolutions and embeddings.  Unbiased, so the estimator stays unbiased; the band widens by
            the sketch's variance, which the smoothing sees from step to step (``collectors.rules.sketch``).
        precondition: the Adam-family optimizer training the model (``torch.optim.Adam``, ``AdamW``, ...): also
            measure B_simple of the gradients divided by Adam's ``sqrt(v_hat) + eps``, the noise of the update
            direction (McCandlish et al. 2018, sec. 2.2; Pollux), as ``m.b_precond`` and ``m.preconditioned``,
            beside the plain value; a controller follows it with ``signal="b_precond"``.  From the micro-batch
            (equal micro-batches) and rank sources; undefined, with the reason, in the optimizer's first 5 steps,
            with the example source and where the divisor cannot be known (docs/how-it-works.md).  Sinks
            receive it as the metrics ``b_precond``, ``b_precond_low``, ``b_precond_high`` and ``b_precond_raw``.

    Raises:
        ConfigError: for an unknown option or an out-of-range value, before any hook is installed.
    """

    def __init__(
        self,
        model: nn.Module,
        source: Source = "auto",
        *,
        per_layer: bool = True,
        halflife: float | None = None,
        confidence: float = 0.9,
        scaler: GradScaler | None = None,
        on_unsupported: Policy | None = None,
        scope: Scope = "all",
        loss_couples_examples: bool = False,
        sinks: Sequence[Sink] = (),
        callbacks: Sequence[Callable[[Measurement], object]] = (),
        run: Any = None,
        comm_hook: CommHook | None = None,
        max_groups: int = DEFAULT_MAX_GROUPS,
        score_every: int = DEFAULT_SCORE_EVERY,
        every: int = 1,
        budget: float | None = None,
        sketch: int | None = None,
        precondition: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if on_unsupported is not None:
            _check_choice("on_unsupported", on_unsupported, _POLICIES)
        _check_choice("scope", scope, _SCOPES)
        if halflife is not None and not (
            isinstance(halflife, (int, float)) and math.isfinite(halflife) and halflife > 0
        ):
            raise ConfigError(f"halflife must be a positive number of examples or None, got {halflife!r}")
        if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
            raise ConfigError(f"confidence must be a float in (0, 1), e.g. 0.9, got {confidence!r}")
        if scaler is not None and not hasattr(scaler, "_scale"):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        cadence = Cadence(every, budget)  # checks the options before anything is installed
        if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, int) or sketch < 1):
            raise ConfigError(f"sketch must be a positive int (random projections per layer, e.g. 64), got {sketch!r}")
        groups = GroupStats(max_groups=max_groups, score_every=score_every, confidence=confidence)
        sink_queue = monitor_sinks(sinks, callbacks, run)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model has no parameter with requires_grad=True: there is no gradient to measure")

        self.per_layer = per_layer
        self.halflife = float(halflife) if halflife is not None else None
        self.confidence = confidence
        self.scaler = scaler
        self.run = run
        self._sinks = sink_queue
        self._groups = groups
        self.requested_source: Source = source
        self._closed = False
        self._dist = data_parallel_sync(model)  # None unless DDP / FSDP2 over >= 2 ranks (before any hook)
        self._pre: PreconditionedNoise | None = None
        if precondition is not None:  # checked before any hook is installed
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self._pre = PreconditionedNoise(precondition, named, z_for(confidence))
        watch = BackwardWatch()
        try:
            self._sources = SourceChoice(
                model,
                source,
                on_unsupported=on_unsupported,
                scope=scope,
                loss_couples_examples=bool(loss_couples_examples),
                comm_hook=comm_hook,
                sync=self._dist,
                watch=watch,
                sketch=sketch,
                preconditioner=self._pre.preconditioner if self._pre is not None else None,
            )
        except Exception:
            if self._pre is not None:
                self._pre.close()
            raise
        # |p.grad|^2 read when backward ends, so clipping or unscaling before step() cannot change it.
        trainable = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        self._big = BigBatchCapture(trainable, self._big_norms, watch)
        self._engine = StepEngine(z_for(confidence))
        self._cadence = self._agreed(cadence)
        self._last: Measurement | None = None  # the last measured step's measurement
        self._since = 0  # examples of the unmeasured steps since the last measured one
        self._last_measured_step = 0
        self._armed = True
        self._warned_single_micro = False
        self._saved_rows: list[str] | None = None  # row names of a loaded state, checked at the first step

        self.step_count = 0
        self.examples = 0
        self._layout: RowLayout | None = None

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def source(self) -> str | None:
        """The source in use (``None`` under ``"auto"`` before the first step)."""
        return self._sources.name

    @property
    def coverage(self) -> float | None:
        """Fraction of the trainable parameter entries measured (``None`` under ``"auto"`` before the first step)."""
        active = self._sources.active
        return active.coverage if active is not None else None

    def step(
        self,
        batch_size: int,
        *,
        micro_batch_sizes: Sequence[int] | None = None,
        groups: torch.Tensor | Sequence[torch.Tensor] | None = None,
        example_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> Measurement:
        """Measure the step whose gradients were just accumulated; call once per optimizer step.

        Args:
            batch_size: examples in the whole optimizer step (all micro-batches, all ranks).
            micro_batch_sizes: sizes of the micro-batches, in backward order, when they are unequal
                (``microbatch`` source); an even split is assumed otherwise.
            groups: the group (data source) of each example of this step on this rank: a 1-D integer tensor in
                backward order, or one per micro-batch; gives ``m.groups`` from the step after the first call
                (example source only; docs/sources.md).
            example_ids: each example's id, likewise: keeps each example's squared gradient norm on sampled steps
                (``m.example_scores``).

        With ``every=`` or ``budget=``, this call also arms the hooks for the next step or disarms them, so call
        it before the next step's first forward pass (a forward pass that runs earlier is not seen by hooks armed
        after it).

        Returns:
            The ``Measurement`` (smoothed value, band, raw value, per layer); status ``"unmeasured"`` for a step
            the cadence leaves out.

        Raises:
            StepError: no backward pass since the last step, or ``batch_size`` contradicts what the hooks saw.
            ConfigError: ``batch_size`` is not a positive int.
            GroupsError: ``groups`` or ``example_ids`` cannot be used; the step was measured without them and
                recorded, and the error's ``measurement`` holds it.
        """
        if self._closed:
            raise StepError("this monitor was closed; create a new GNSMonitor to measure again")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int (examples in the optimizer step), got {batch_size!r}")
        started = self._cadence.started()
        if not self._armed:  # left out by the cadence: nothing was collected, nothing is read
            measurement = self._unmeasured(batch_size, started)
            if groups is not None or example_ids is not None:
                measurement.groups_reason = "this step was not measured (every= / budget= left it out)"
            return measurement
        collector = self._sources.choose()
        if self._pre is not None and self._sources.name == "example":
            self._pre.stop()  # per-example norms are not preconditioned: free its buffers, read nothing more
        pending = self._groups.begin(collector, groups, example_ids)  # what the hooks kept for groups, ids checked
        try:
            if self._dist is None:
                stats = collector.collect(batch_size, micro_batch_sizes)
            else:  # this rank's share of the step, in the whole step's units
                stats = self._dist.collect(collector, batch_size, micro_batch_sizes)
            if self.step_count == 0:
                collector.check_first_step(None if self._dist is None else self._dist.any_rank)
            big = self._big.take([p for _, p in collector.params])
        except StepError as e:
            if self._since:  # hooks armed by the last step() only: a forward pass before it was not seen
                raise StepError(f"{e}. {_ARMED_LATE}") from e
            raise
        finally:
            for c in self._sources.collectors.values():
                c.reset()
            self._big.reset()
            if self._pre is not None:
                self._pre.preconditioner.reset()
        if self.halflife is None:
            self.halflife = float(DEFAULT_HALFLIFE_STEPS * batch_size)
        measurement = self._measure(collector, stats, big, batch_size)  # counts only once this step is measured
        error = self._groups.finish(
            pending, measurement, batch_size=batch_size, halflife=self.halflife, sync=self._dist
        )
        self._sinks.put(measurement)
        self._last = measurement
        self._next_step(True, started, batch_size)
        if error is not None:
            raise error
        return measurement

    @property
    def sinks(self) -> list[Sink]:
        """Every sink fed by this monitor (``sinks=``, then ``callbacks=``, then ``run=``)."""
        return list(self._sinks.sinks)

    def log(self, metrics: Mapping[str, object], *, step: int | None = None) -> None:
        """Send your own numbers to every sink, e.g. ``monitor.log({"loss": loss})``; never waits.

        Args:
            metrics: name -> a Python number or a one-element tensor (copied now, read on the sinks' thread, so a
                device tensor costs the training loop no synchronisation).
            step: the step they belong to; by default the last step given to ``step()`` (``monitor.step_count``),
                so they line up with its measurement.

        Raises:
            ConfigError: a name is not a non-empty string, or a value is not a number or one-element tensor.
        """
        values = metric_values(metrics)
        at = self.step_count if step is None else _checked_step(step)
        examples = self.examples if at == self.step_count else None
        # Values may still be tensors here: the sinks' thread reads them (SinkQueue), so no sync happens now.
        self._sinks.put(Metrics(step=at, examples=examples, wall_time=time.time(), values=values))  # type: ignore[arg-type]

    def event(
        self, kind: str, message: str = "", *, step: int | None = None, data: Mapping[str, Any] | None = None
    ) -> None:
        """Send an event (a note, a decision) to every sink; same arguments as ``Run.event``.

        Raises:
            ConfigError: ``kind`` is not a non-empty string, or ``data`` is not a mapping.
        """
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"event kind must be a non-empty string, got {kind!r}")
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"event data must be a mapping (a dict), got {type(data).__name__}")
        at = self.step_count if step is None else _checked_step(step)
        examples = self.examples if at == self.step_count else None
        self._sinks.put(Event(kind=kind, message=str(message), step=at, examples=examples, data=data))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every sink has received and flushed what was sent so far; ``False`` on timeout."""
        return self._sinks.flush(timeout)

    def close(self) -> None:
        """Remove every hook (the model is left exactly as it was), deliver what the sinks have queued, flush them
        and close those given in ``sinks=``.  Idempotent."""
        self._sources.close()
        self._groups.close()
        self._big.close()
        if self._pre is not None:
            self._pre.close()
        self._closed = True
        self._sinks.close()

    def __enter__(self) -> GNSMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the averages identically after a restart."""
        return {
            "version": _STATE_VERSION,
            "step_count": self.step_count,
            "examples": self.examples,
            "halflife": self.halflife,
            "source": self.source,
            "row_names": self._layout.row_names if self._layout is not None else None,
            "cadence": self._cadence.state_dict(),
            "examples_since_measured": self._since,
            "last_measured_step": self._last_measured_step,
            **self._engine.state_dict(),  # "ema", "skipped"
            "groups": self._groups.state_dict(),
            "preconditioned": self._pre.engine.state_dict() if self._pre is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the model must have the same measured parameters (and cadence options)."""
        version = state.get("version")
        if version not in (1, 2, _STATE_VERSION):
            raise ConfigError(f"unsupported monitor state version {version!r}; expected {_STATE_VERSION}")
        src = state["source"]
        if src is not None:
            self._sources.select(src)
        self.step_count = int(state["step_count"])
        self.examples = int(state["examples"])
        self.halflife = state["halflife"]
        self._engine.load_state_dict(state)
        if self._pre is not None and state.get("preconditioned") is not None:
            self._pre.engine.load_state_dict(state["preconditioned"])
        self._saved_rows = state["row_names"]
        self._layout = None
        self._last = None
        if version == 1:  # saved before cadences existed: every step was measured
            self._since = 0
            self._cadence.next_due = self.step_count + 1
        else:
            self._cadence.load_state_dict(state["cadence"])
            self._since = int(state["examples_since_measured"])
            self._last_measured_step = int(state["last_measured_step"])
        armed = self._cadence.due(self.step_count + 1)
        for c in self._sources.collectors.values():
            c.arm(armed, step=self.step_count + 1)
        self._big.armed = armed
        self._armed = armed
        self._groups.load_state_dict(state.get("groups"), self._sources.active)

    # -- internals ---------------------------------------------------------------------------------------------

    def _agreed(self, cadence: Cadence) -> Cadence:
        """The cadence, with rank 0's choices broadcast to every rank under data parallelism."""
        sync = self._dist
        if sync is None or not cadence.adaptive:
            return cadence
        return Cadence(budget=cadence.budget, agree=sync.agree, is_rank0=sync.rank == 0)

    def _unmeasured(self, batch_size: int, started: float) -> Measurement:
        """A step the cadence left out: counted, and shown with the last measurement's values."""
        self.step_count += 1
        self.examples += batch_size
        self._since += batch_size
        last = self._last if self._last is not None else self._restored_last()
        measurement = Measurement.unmeasured(last, step=self.step_count, examples=self.examples, batch_size=batch_size)
        self._next_step(False, started, batch_size)
        return measurement

    def _next_step(self, measured: bool, started: float, batch_size: int) -> None:
        """Record the cadence's choice, if it made one, and arm or disarm the hooks for the next step."""
        if self.halflife is not None:  # a few measurements per smoothing half-life at least (``cadence``)
            self._cadence.sparsest = max(1, int(self.halflife // (PER_HALFLIFE * batch_size)))
        chosen = self._cadence.finished(self.step_count, measured, started, self._read_band)
        if chosen is not None or (self.step_count == 1 and self._cadence.initial is not None):
            every = self._cadence.every
            how = "chosen within the budget" if self._cadence.adaptive else "fixed"
            if self._cadence.adaptive and self._cadence.capped:
                how = f"{PER_HALFLIFE} times per smoothing half-life at least; the budget alone would measure less"
            self.event("cadence", f"measuring one step in {every} ({how})", data={"every": every})
        nxt = self.step_count + 1
        armed = self._cadence.due(nxt)
        if armed or armed != self._armed:
            for c in self._sources.collectors.values():
                c.arm(armed, step=nxt)
            self._big.armed = armed
            self._armed = armed

    def _read_band(self) -> tuple[float | None, float | None, float | None]:
        m = self._last
        return (None, None, None) if m is None else (m.b_simple, m.b_simple_low, m.b_simple_high)

    def _restored_last(self) -> Measurement:
        """After ``load_state_dict``, before the first measured step: the restored averages as a measurement."""
        collector = self._sources.choose()
        layout = self._layout_for(collector)
        out = self._engine.current(layout)
        self._last = Measurement(
            table=out.table,
            flags=out.flags,
            layer_names=layout.layer_names,
            module_names=layout.module_names,
            step=self._last_measured_step,
            examples=self.examples,
            batch_size=0,
            source=self._sources.name or "",
            coverage=collector.coverage,
        )
        if self._pre is not None:
            self._last.preconditioned = self._pre.current(layout, self._last)
        return self._last

    def _measure(
        self, collector: Collector, stats: SmallBatchStats, big_norms: BigBatchNorms | str, batch_size: int
    ) -> Measurement:
        layout = self._layout_for(collector)
        undefined_reason = None
        if isinstance(big_norms, str):  # p.grad changed after a backward pass that was not read
            undefined_reason = big_norms
            warnings.warn(undefined_reason, RuntimeWarning, stacklevel=3)
            big_norms = BigBatchNorms(ParamSums([0.0] * len(collector.params)))
        if self._dist is None:
            small, big = stats.small_sq_sum, big_norms.sq_norms
        else:  # one tiny collective: the ranks' statistics (and FSDP2's sharded big norms) summed, same bits everywhere
            stats, big = self._dist.reduce(stats, big_norms, batch_size)
            small = stats.small_sq_sum
        small, big = self._unscale(small), self._unscale(big)
        if undefined_reason is None and (stats.n_small < 2 or stats.inv_size_sum / stats.n_small <= 1.0 / batch_size):
            undefined_reason = self._sources.too_few_small_batches(stats.n_small)
            if not self._warned_single_micro:
                warnings.warn(undefined_reason, RuntimeWarning, stacklevel=3)
                self._warned_single_micro = True
        assert self.halflife is not None
        consts = StepConstants(
            n_small=stats.n_small,
            inv_size_sum=stats.inv_size_sum,
            batch_size=batch_size,
            beta=decay_for(self._since + batch_size, self.halflife),  # the examples since the last measurement
            z=self._engine.z,
            defined=undefined_reason is None,
        )
        out = self._engine.step(layout, small, big, consts)
        self.step_count += 1
        self.examples += batch_size
        self._since = 0
        self._last_measured_step = self.step_count
        measurement = Measurement(
            table=out.table,
            flags=out.flags,
            layer_names=layout.layer_names,
            module_names=layout.module_names,
            step=self.step_count,
            examples=self.examples,
            batch_size=batch_size,
            source=self._sources.name or "",
            coverage=collector.coverage,
            undefined_reason=undefined_reason,
        )
        if self._pre is not None:
            measurement.preconditioned = self._pre.measure(layout, stats, big_norms, consts, self._unscale, measurement)
        return measurement

    def _unscale(self, sums: ParamSums) -> ParamSums:
        """Squared norms of gradients at a ``GradScaler``'s loss scale, divided by the scale squared.

        Both the hooks and the big batch read the gradients before ``unscale_()`` can run, so both are scaled.
        """
        scale = self._loss_scale()
        if scale is None:
            return sums
        if sums.on_host:  # host path: the scale is on the host as well
            return sums.scaled(1.0 / float(scale.item()) ** 2)
        return sums.scaled(scale.to(device=sums.device, dtype=torch.float64).reciprocal().square())

    def _big_norms(self, params: Sequence[nn.Parameter]) -> BigBatchNorms:
        """``|p.grad|^2`` of ``params``: Python floats for gradients in host memory, else a device tensor."""
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else params[0].device
        if self._dist is not None and self._dist.has_sharded_grads(params):
            return BigBatchNorms(ParamSums(self._dist.big_sq_contributions(params, device)), rank_part=True)
        if all(g.device.type == "cpu" for g in grads):
            norms = BigBatchNorms(ParamSums(grad_sq_norms_host(params)))
        else:
            norms = BigBatchNorms(ParamSums(grad_sq_norms(params, device)))
        return norms if self._pre is None else self._pre.big_norms(params, norms, self._loss_scale())

    def _loss_scale(self) -> torch.Tensor | None:
        """The scale a ``GradScaler`` put on the gradients, as a 0-d tensor (no host read), or ``None``."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return None
        return scaler._scale

    def _layout_for(self, collector: Collector) -> RowLayout:
        if self._layout is None:
            self._layout = RowLayout([n for n, _ in collector.params], self.per_layer)
            saved = self._saved_rows
            if saved is not None and saved != self._layout.row_names:
                raise ConfigError(
                    "the loaded monitor state was saved for different parameters: "
                    f"{len(saved)} rows saved, {len(self._layout.row_names)} here; load it into the same model"
                )
        return self._layout


def _checked_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative int (the monitor numbers its steps from 1), got {step!r}")
    return step


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
