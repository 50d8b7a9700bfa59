"""``GNSMonitor``: the one stateful facade, collector -> estimator -> measurement -> sinks.

Usage, in any training loop (after the backward pass(es), before clipping and ``optimizer.step()``)::

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
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from noisescale.collectors.base import Collector, SmallBatchStats
from noisescale.collectors.example import ExampleCollector, Policy, Scope
from noisescale.collectors.microbatch import MicrobatchCollector
from noisescale.collectors.rank import RankCollector
from noisescale.distributed import CommHook, data_parallel_sync, is_ddp
from noisescale.errors import ConfigError, NoiseScaleError, StepError
from noisescale.estimators.band import z_for
from noisescale.estimators.scalar import RowState
from noisescale.estimators.smoothing import EMAState, decay_for, ema_init
from noisescale.estimators.step import StepConstants, device_step, host_step, rows_to_state, state_to_rows
from noisescale.events import Event, Metrics
from noisescale.grad_norms import grad_sq_norms, grad_sq_norms_host
from noisescale.sink import CallbackSink, Sink, is_sink
from noisescale.sink_queue import SinkQueue
from noisescale.types import Measurement

if TYPE_CHECKING:
    from torch.amp import GradScaler

__all__ = ["GNSMonitor", "Source"]

_Sums = torch.Tensor | list[float]
"""Per-parameter sums: a float64 tensor on the device path, Python floats on the host path."""

Source = Literal["auto", "example", "microbatch", "rank"]
_SOURCES = ("auto", "example", "microbatch", "rank")
_POLICIES = ("error", "warn", "ignore")
_SCOPES = ("all", "norm")
_STATE_VERSION = 1
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
            step and keeps ``"microbatch"`` if it had two or more backward passes (almost free), else
            ``"example"``.  Under DDP and FSDP2 every source sums
            its statistics over the ranks once per step, and every rank gets the same measurement.
        per_layer: also estimate per parameter tensor and per module (``m.layers``, ``m.modules``).
        halflife: smoothing half-life counted in examples; ``None`` means 25 steps of the first batch size.
        confidence: nominal coverage of the band ``[b_simple_low, b_simple_high]``.
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any, so ``grad_sq`` and ``trace_cov`` are
            reported unscaled (B_simple is scale-free either way).  ``step()`` may come before or after
            ``scaler.unscale_(optimizer)``.
        on_unsupported: for ``source="example"``/``"auto"``: ``"error"``, ``"warn"`` or ``"ignore"`` trainable
            layers without a norm rule and tied weights (see ``ExampleCollector``); ``m.coverage`` says what was
            measured.
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
        on_unsupported: Policy = "error",
        scope: Scope = "all",
        sinks: Sequence[Sink] = (),
        callbacks: Sequence[Callable[[Measurement], object]] = (),
        run: Any = None,
        comm_hook: CommHook | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_choice("source", source, _SOURCES)
        _check_choice("on_unsupported", on_unsupported, _POLICIES)
        _check_choice("scope", scope, _SCOPES)
        if scope == "norm" and source in ("microbatch", "rank"):
            raise ConfigError("scope='norm' needs per-example norms: use source='example' or 'auto'")
        if comm_hook is not None and source != "rank":
            raise ConfigError(f"comm_hook=(state, hook) is for the rank source: pass source='rank', not {source!r}")
        if halflife is not None and not (
            isinstance(halflife, (int, float)) and math.isfinite(halflife) and halflife > 0
        ):
            raise ConfigError(f"halflife must be a positive number of examples or None, got {halflife!r}")
        if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
            raise ConfigError(f"confidence must be a float in (0, 1), e.g. 0.9, got {confidence!r}")
        if scaler is not None and not hasattr(scaler, "_scale"):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        sink_queue = _sink_queue(sinks, callbacks, run)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model has no parameter with requires_grad=True: there is no gradient to measure")

        self.per_layer = per_layer
        self.halflife = float(halflife) if halflife is not None else None
        self.confidence = confidence
        self._z = z_for(confidence)
        self.scaler = scaler
        self.run = run
        self._sinks = sink_queue
        self.requested_source: Source = source
        self._closed = False
        self._dist = data_parallel_sync(model)  # None unless DDP / FSDP2 over >= 2 ranks (before any hook)
        self._collectors: dict[str, Collector] = {}
        self._example_refusal: str | None = None  # why "auto" could not use the example source
        if source in ("example", "auto"):
            try:
                self._collectors["example"] = ExampleCollector(model, on_unsupported=on_unsupported, scope=scope)
            except NoiseScaleError as e:
                if source == "example" or scope == "norm":
                    raise
                self._example_refusal = str(e)
        if source in ("microbatch", "auto"):
            self._collectors["microbatch"] = MicrobatchCollector(model)
        if source == "rank":
            self._collectors["rank"] = RankCollector(model, comm_hook=comm_hook, sync=self._dist)
        self._active: Collector | None = self._collectors[source] if source != "auto" else None
        if source == "auto" and self._dist is not None and is_ddp(model) and scope == "all":
            # Under DDP the ranks are small batches for free: the cheapest source.
            self._collectors["rank"] = RankCollector(model, sync=self._dist)
            self._select("rank")
        self._warned_single_micro = False
        self._host_path: bool | None = None  # None: by device (tests force the device path on CPU)
        self._saved_rows: list[str] | None = None  # row names of a loaded state, checked at the first step

        self.step_count = 0
        self.examples = 0
        self._ema: EMAState | tuple[RowState, ...] | None = None
        self._skipped: torch.Tensor | int = 0
        self._layout: _Layout | None = None

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def source(self) -> str | None:
        """The collector in use (``None`` under ``"auto"`` before the first step)."""
        return self._active.source if self._active is not None else None

    @property
    def coverage(self) -> float | None:
        return self._active.coverage if self._active is not None else None

    def step(self, batch_size: int, *, micro_batch_sizes: Sequence[int] | None = None) -> Measurement:
        """Measure the step whose gradients were just accumulated; call once per optimizer step.

        Args:
            batch_size: examples in the whole optimizer step (all micro-batches, all ranks).
            micro_batch_sizes: sizes of the micro-batches, in backward order, when they are unequal
                (``microbatch`` source); an even split is assumed otherwise.

        Returns:
            The ``Measurement`` (smoothed value, band, raw value, per layer).

        Raises:
            StepError: no backward pass since the last step, or ``batch_size`` contradicts what the hooks saw.
            ConfigError: ``batch_size`` is not a positive int.
        """
        if self._closed:
            raise StepError("this monitor was closed; create a new GNSMonitor to measure again")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int (examples in the optimizer step), got {batch_size!r}")
        collector = self._choose_collector()
        try:
            if self._dist is None:
                stats = collector.collect(batch_size, micro_batch_sizes)
            else:  # this rank's share of the step, in the whole step's units
                stats = self._dist.collect(collector, batch_size, micro_batch_sizes)
            if self.step_count == 0 and isinstance(collector, ExampleCollector):
                _refuse_unmeasured(collector, None if self._dist is None else self._dist.any_rank)
        finally:
            for c in self._collectors.values():
                c.reset()
        if self.halflife is None:
            self.halflife = float(DEFAULT_HALFLIFE_STEPS * batch_size)
        measurement = self._measure(collector, stats, batch_size)  # counts only once this step is measured
        self._sinks.put(measurement)
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
            step: the step they belong to; by default the last measured step (``monitor.step_count``), so they
                line up with its measurement.

        Raises:
            ConfigError: a name is not a non-empty string, or a value is not a number or one-element tensor.
        """
        values = _checked_metrics(metrics)
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
        for c in self._collectors.values():
            c.close()
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
            "ema": self._saved_ema(),
            "skipped": int(self._skipped),
        }

    def _saved_ema(self) -> dict[str, torch.Tensor] | None:
        if self._ema is None:
            return None
        state = rows_to_state(self._ema) if isinstance(self._ema, tuple) else self._ema
        return state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the model must have the same measured parameters."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"unsupported monitor state version {state.get('version')!r}; expected {_STATE_VERSION}")
        src = state["source"]
        if src is not None:
            if src not in self._collectors:
                raise ConfigError(f"the saved state used source {src!r}, this monitor has {sorted(self._collectors)}")
            self._select(src)
        self.step_count = int(state["step_count"])
        self.examples = int(state["examples"])
        self.halflife = state["halflife"]
        self._ema = None if state["ema"] is None else EMAState.from_state_dict(state["ema"])
        self._saved_rows = state["row_names"]
        self._skipped = int(state["skipped"])
        self._layout = None

    # -- internals ---------------------------------------------------------------------------------------------

    def _select(self, name: str) -> None:
        for other, c in list(self._collectors.items()):
            if other != name:
                c.close()
                del self._collectors[other]
        self._active = self._collectors[name]

    def _choose_collector(self) -> Collector:
        if self._active is not None:
            return self._active
        micro = self._collectors.get("microbatch")
        assert isinstance(micro, MicrobatchCollector)
        if micro.micro_batches_seen() >= 2 or "example" not in self._collectors:
            self._select("microbatch")
        else:
            self._select("example")
        assert self._active is not None
        return self._active

    def _measure(self, collector: Collector, stats: SmallBatchStats, batch_size: int) -> Measurement:
        params = collector.params
        layout = self._layout_for(collector)
        small: torch.Tensor | list[float]
        big: torch.Tensor | list[float]
        if self._dist is None:
            sums = stats.small_sq_sum
            device = sums.device if isinstance(sums, torch.Tensor) else torch.device("cpu")
            host = device.type == "cpu" if self._host_path is None else self._host_path
            if host:  # straight to Python floats
                small = sums if isinstance(sums, list) else sums.tolist()
                big = grad_sq_norms_host([p for _, p in params])
            else:
                small = stats.small_sq_tensor(device).to(torch.float64)
                big = grad_sq_norms([p for _, p in params], device)
        else:  # one tiny collective: the ranks' statistics (and FSDP2's sharded big norms) summed, same bits everywhere
            stats, small, big = self._dist.reduce(collector, stats, batch_size)
            host = small.device.type == "cpu" if self._host_path is None else self._host_path
            if host:
                small, big = small.tolist(), big.tolist()
        small, big = self._unscale(small, big)
        undefined_reason = None
        if stats.n_small < 2 or stats.inv_size_sum / stats.n_small <= 1.0 / batch_size:
            undefined_reason = (
                f"only {stats.n_small} small batch(es) in this step: the {collector.source} source needs at least "
                "two (use gradient accumulation with >= 2 micro-batches, or source='example')"
            )
            if self._example_refusal is not None:
                # "auto" fell back to this source; suggesting source='example' would only move the user to that error.
                undefined_reason = (
                    f"source='auto' measures with the {collector.source} source because the example source cannot "
                    f"measure this model ({self._example_refusal}), and the {collector.source} source needs at least "
                    f"two small batches per step, this one had {stats.n_small}: use gradient accumulation with >= 2 "
                    "micro-batches, or pass on_unsupported='warn' to measure the supported layers per example"
                )
            if not self._warned_single_micro:
                warnings.warn(undefined_reason, RuntimeWarning, stacklevel=3)
                self._warned_single_micro = True
        assert self.halflife is not None
        consts = StepConstants(
            n_small=stats.n_small,
            inv_size_sum=stats.inv_size_sum,
            batch_size=batch_size,
            beta=decay_for(batch_size, self.halflife),
            z=self._z,
            defined=undefined_reason is None,
        )
        if isinstance(small, list):
            assert isinstance(big, list)
            # Host path: a handful of floats per row beats a hundred tiny tensor operations.
            small_rows, big_rows = layout.host_rows(small), layout.host_rows(big)
            result = host_step(self._host_state(layout), small_rows, big_rows, consts, skipped=int(self._skipped))
        else:
            assert isinstance(big, torch.Tensor)
            rows = layout.rows(torch.stack([small, big]))  # (2, R)
            result = device_step(
                self._device_state(layout, rows.device),
                rows[0],
                rows[1],
                consts,
                skipped=self._device_skipped(rows.device),
            )
        self._ema, self._skipped = result.state, result.skipped
        self.step_count += 1
        self.examples += batch_size
        table, flags = result.table, result.flags
        return Measurement(
            table=table,
            flags=flags,
            layer_names=layout.layer_names,
            module_names=layout.module_names,
            step=self.step_count,
            examples=self.examples,
            batch_size=batch_size,
            source=collector.source,
            coverage=collector.coverage,
            undefined_reason=undefined_reason,
        )

    def _host_state(self, layout: _Layout) -> tuple[RowState, ...]:
        state = self._ema
        if isinstance(state, EMAState):  # loaded from a state_dict, or moved from a device
            state = state_to_rows(state)
        if state is None or len(state) != layout.n_rows:
            state = tuple(RowState() for _ in range(layout.n_rows))
        return state

    def _device_state(self, layout: _Layout, device: torch.device) -> EMAState:
        state = self._ema
        if isinstance(state, tuple):
            state = rows_to_state(state, device=device)
        if state is None or state.n.shape[0] != layout.n_rows:
            state = ema_init(layout.n_rows, device=device)
        if state.n.device != device:
            state = EMAState(sums=state.sums.to(device), n=state.n.to(device))
        return state

    def _device_skipped(self, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(self._skipped, dtype=torch.int64).to(device)

    def _unscale(self, small: _Sums, big: _Sums) -> tuple[_Sums, _Sums]:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return small, big
        # Hooks saw gradients at the loss scale; p.grad is still scaled unless unscale_() already ran.
        big_scaled = not _already_unscaled(scaler)
        if isinstance(small, list):  # host path: the scale is on the host as well
            assert isinstance(big, list)
            inv = 1.0 / float(scaler._scale.item())
            inv_s2 = inv * inv
            return [v * inv_s2 for v in small], ([v * inv_s2 for v in big] if big_scaled else big)
        inv_s2_t = scaler._scale.to(device=small.device, dtype=torch.float64).reciprocal().square()
        return small * inv_s2_t, (big * inv_s2_t if big_scaled else big)

    def _layout_for(self, collector: Collector) -> _Layout:
        if self._layout is None:
            self._layout = _Layout([n for n, _ in collector.params], self.per_layer)
            saved = self._saved_rows
            if saved is not None and saved != self._layout.row_names:
                raise ConfigError(
                    "the loaded monitor state was saved for different parameters: "
                    f"{len(saved)} rows saved, {len(self._layout.row_names)} here; load it into the same model"
                )
        return self._layout


class _Layout:
    """Rows of the measurement table: the total, then each parameter, then each module (if ``per_layer``)."""

    def __init__(self, param_names: list[str], per_layer: bool) -> None:
        self.per_layer = per_layer
        self.layer_names = param_names if per_layer else []
        modules: dict[str, int] = {}
        owner = []
        for n in param_names:
            owner.append(modules.setdefault(n.rpartition(".")[0], len(modules)))
        self.module_names = list(modules) if per_layer else []
        self._owner_list = owner
        self._owner = torch.tensor(owner, dtype=torch.long)
        self.n_rows = 1 + len(self.layer_names) + len(self.module_names)
        self.row_names = ["total", *self.layer_names, *(f"module:{m}" for m in self.module_names)]
        self._matrix: torch.Tensor | None = None

    def host_rows(self, per_param: list[float]) -> list[float]:
        """Per-parameter sums -> rows (total, parameters, modules), on the host."""
        total = sum(per_param)
        if not self.per_layer:
            return [total]
        modules = [0.0] * len(self.module_names)
        for value, owner in zip(per_param, self._owner_list):
            modules[owner] += value
        return [total, *per_param, *modules]

    def rows(self, per_param: torch.Tensor) -> torch.Tensor:
        """``(2, P)`` per-parameter sums -> ``(2, R)`` rows (total, parameters, modules): one matmul."""
        if self._matrix is None or self._matrix.device != per_param.device:
            n_params = self._owner.shape[0]
            # (P, R) 0/1 matrix: column 0 sums everything, then the identity, then module membership.
            matrix = torch.zeros(n_params, self.n_rows, dtype=torch.float64)
            matrix[:, 0] = 1.0
            if self.per_layer:
                idx = torch.arange(n_params)
                matrix[idx, 1 + idx] = 1.0
                matrix[idx, 1 + n_params + self._owner] = 1.0
            self._matrix = matrix.to(per_param.device)
        return per_param @ self._matrix


def _refuse_unmeasured(
    collector: ExampleCollector, any_rank: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    # First step only.  Under DDP and FSDP2 the ranks pool what they saw (one small all-reduce): a layer that ran
    # on one rank only gets the averaged gradient on the others (conditional computation), which is no error.
    names = collector.unmeasured_with_gradients(any_rank)
    if names:
        attention = [n for n in names if n in collector.attention_params]
        why = (
            "Those of nn.MultiheadAttention are measured from the matrix products inside its forward, which a "
            "torch.compile'd graph hides: keep its forward eager (attn.forward = torch.compiler.disable(attn.forward)"
            "), or use source='microbatch'."
            if attention
            else "Some code uses them without calling their module (a parent passing the weights to a function), so "
            "their per-example norms are unknown and the estimate would be biased. Register a norm rule for the "
            "module that uses them, or use source='microbatch'."
        )
        raise StepError(f"these measured parameters got gradients, but no hook of their layer saw them: {names}. {why}")


class _LogMeasurementSink:
    """An object with only ``log_measurement(measurement)`` (``run=`` before the sink seam), as a sink."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def on_measurement(self, measurement: Measurement) -> None:
        self.run.log_measurement(measurement)

    def on_metrics(self, metrics: Metrics) -> None:
        return None

    def on_event(self, event: Event) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return repr(self.run)


def _sink_queue(sinks: Sequence[Sink], callbacks: Sequence[Callable[[Measurement], object]], run: Any) -> SinkQueue:
    """The monitor's sinks, checked: ``sinks=`` (closed with the monitor), ``callbacks=``, ``run=`` (left open)."""
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence):
        raise ConfigError(f"sinks must be a list of sinks, e.g. sinks=[run], got {type(sinks).__name__}")
    for s in sinks:
        if not is_sink(s):
            raise ConfigError(
                f"{type(s).__name__} is not a sink: a sink needs on_measurement, on_metrics, on_event, flush and "
                "close methods (subclass noisescale.sink.BaseSink and override what you need)"
            )
    for cb in callbacks:
        if not callable(cb):
            raise ConfigError(f"callbacks must be functions of a Measurement, got {type(cb).__name__}")
    all_sinks: list[Sink] = [*sinks, *(CallbackSink(cb) for cb in callbacks)]
    owned = [True] * len(all_sinks)
    if run is not None:
        if is_sink(run):
            all_sinks.append(run)
        elif callable(getattr(run, "log_measurement", None)):
            all_sinks.append(_LogMeasurementSink(run))
        else:
            raise ConfigError(
                f"run must be a run store (ns.Run), a sink, or have a log_measurement(measurement) method, got "
                f"{type(run).__name__}"
            )
        owned.append(False)
    return SinkQueue(all_sinks, owned=owned)


def _checked_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative int (the monitor numbers its steps from 1), got {step!r}")
    return step


def _checked_metrics(metrics: Mapping[str, object]) -> dict[str, object]:
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a mapping like {{'loss': 0.3}}, got {type(metrics).__name__}")
    out: dict[str, object] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"metric names must be non-empty strings, got {key!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigError(f"metric {key!r} must be a number or a one-element tensor, got shape {value.shape}")
            # Copy now (asynchronously, no sync) so a later in-place change by the caller cannot alter it.
            value = value.detach().clone()
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"metric {key!r} must be a number or a one-element tensor, got {value!r}")
        out[key] = value
    return out


def _already_unscaled(scaler: Any) -> bool:
    try:
        from torch.amp.grad_scaler import OptState
    except ImportError:  # pragma: no cover - older torch
        return False
    return any(s.get("stage") is OptState.UNSCALED for s in scaler._per_optimizer_states.values())


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
