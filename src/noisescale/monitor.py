"""``GNSMonitor``: the one stateful facade, collector -> estimator -> measurement (and run / callbacks).

Usage, in any training loop (after the backward pass(es), before clipping and ``optimizer.step()``)::

    monitor = ns.GNSMonitor(model)
    ...
    loss.backward()
    m = monitor.step(batch_size=len(x))
    m.b_simple, m.b_simple_low, m.b_simple_high
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from noisescale.collectors.base import Collector, SmallBatchStats
from noisescale.collectors.example import ExampleCollector, Policy, Scope
from noisescale.collectors.microbatch import MicrobatchCollector
from noisescale.errors import ConfigError, NoiseScaleError, StepError
from noisescale.estimators.band import fieller_band, z_for
from noisescale.estimators.smoothing import EMAState, decay_for, ema_init, ema_moments, ema_update
from noisescale.estimators.two_batch import two_batch_from_sums
from noisescale.types import Measurement

__all__ = ["GNSMonitor", "Source"]

Source = Literal["auto", "example", "microbatch"]
_SOURCES = ("auto", "example", "microbatch")
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
        source: ``"example"`` (per-example norms through the rule registry), ``"microbatch"`` (one norm per
            backward pass; needs gradient accumulation with at least two micro-batches), or ``"auto"``: watches
            the first step and keeps ``"microbatch"`` if it had two or more backward passes (almost free),
            else ``"example"``.
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
        callbacks: functions called with every ``Measurement``.
        run: an object with ``log_measurement(measurement)`` (the run store) receiving every measurement.

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
        scaler: Any = None,
        on_unsupported: Policy = "error",
        scope: Scope = "all",
        callbacks: Sequence[Callable[[Measurement], None]] = (),
        run: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_choice("source", source, _SOURCES)
        _check_choice("on_unsupported", on_unsupported, _POLICIES)
        _check_choice("scope", scope, _SCOPES)
        if scope == "norm" and source == "microbatch":
            raise ConfigError("scope='norm' needs per-example norms: use source='example' or 'auto'")
        if halflife is not None and not (
            isinstance(halflife, (int, float)) and math.isfinite(halflife) and halflife > 0
        ):
            raise ConfigError(f"halflife must be a positive number of examples or None, got {halflife!r}")
        if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
            raise ConfigError(f"confidence must be a float in (0, 1), e.g. 0.9, got {confidence!r}")
        if scaler is not None and not hasattr(scaler, "_scale"):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if run is not None and not callable(getattr(run, "log_measurement", None)):
            raise ConfigError(f"run must have a log_measurement(measurement) method, got {type(run).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model has no parameter with requires_grad=True: there is no gradient to measure")

        self.per_layer = per_layer
        self.halflife = float(halflife) if halflife is not None else None
        self.confidence = confidence
        self._z = z_for(confidence)
        self.scaler = scaler
        self.callbacks = list(callbacks)
        self.run = run
        self.requested_source: Source = source
        self._closed = False
        self._collectors: dict[str, Collector] = {}
        if source in ("example", "auto"):
            try:
                self._collectors["example"] = ExampleCollector(model, on_unsupported=on_unsupported, scope=scope)
            except NoiseScaleError:
                if source == "example" or scope == "norm":
                    raise
        if source in ("microbatch", "auto"):
            self._collectors["microbatch"] = MicrobatchCollector(model)
        self._active: Collector | None = self._collectors[source] if source != "auto" else None
        self._warned_single_micro = False

        self.step_count = 0
        self.examples = 0
        self._ema: EMAState | None = None
        self._skipped: torch.Tensor | None = None
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
            stats = collector.collect(batch_size, micro_batch_sizes)
        finally:
            for c in self._collectors.values():
                c.reset()
        if self.halflife is None:
            self.halflife = float(DEFAULT_HALFLIFE_STEPS * batch_size)
        self.step_count += 1
        self.examples += batch_size
        measurement = self._measure(collector, stats, batch_size)
        if self.run is not None:
            self.run.log_measurement(measurement)
        for cb in self.callbacks:
            cb(measurement)
        return measurement

    def close(self) -> None:
        """Remove every hook; the model is left exactly as it was.  Idempotent."""
        for c in self._collectors.values():
            c.close()
        self._closed = True

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
            "ema": self._ema.state_dict() if self._ema is not None else None,
            "skipped": int(self._skipped.item()) if self._skipped is not None else 0,
        }

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
        self._skipped = torch.tensor(int(state["skipped"]))
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
        small = stats.small_sq_sum.to(torch.float64)
        big = _big_sq_norms([p for _, p in params], small.device)
        small, big = self._unscale(small, big)
        per_param = torch.stack([small, big])  # (2, P)
        rows = layout.rows(per_param)  # (2, R)
        if self._ema is None or self._ema.w.shape[0] != layout.n_rows:
            self._ema = ema_init(layout.n_rows, device=rows.device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=rows.device)
        assert self._skipped is not None
        if self._skipped.device != rows.device:
            self._skipped = self._skipped.to(rows.device)

        undefined_reason = None
        if stats.n_small < 2 or stats.inv_size_sum / stats.n_small <= 1.0 / batch_size:
            undefined_reason = (
                f"only {stats.n_small} small batch(es) in this step: the {collector.source} source needs at least "
                "two (use gradient accumulation with >= 2 micro-batches, or source='example')"
            )
            if not self._warned_single_micro:
                warnings.warn(undefined_reason, RuntimeWarning, stacklevel=3)
                self._warned_single_micro = True
            nan = torch.full((layout.n_rows,), float("nan"), dtype=torch.float64, device=rows.device)
            grad_sq_raw, trace_cov_raw = nan, nan
        else:
            est = two_batch_from_sums(rows[0], stats.n_small, stats.inv_size_sum, rows[1], batch_size)
            grad_sq_raw, trace_cov_raw = est.grad_sq, est.trace_cov

        finite = torch.isfinite(grad_sq_raw) & torch.isfinite(trace_cov_raw)
        nonfinite_step = ~torch.isfinite(rows).all()
        signal = (rows[1] > 0) | (rows[0] > 0)
        mask = finite & signal & ~nonfinite_step
        assert self.halflife is not None
        self._ema = ema_update(self._ema, grad_sq_raw, trace_cov_raw, decay_for(batch_size, self.halflife), mask)
        self._skipped = self._skipped + nonfinite_step.to(torch.int64)

        mom = ema_moments(self._ema)
        defined = (self._ema.n > 0) & (mom.grad_sq != 0)
        nan_r = torch.full_like(mom.grad_sq, float("nan"))
        b_simple = torch.where(defined, mom.trace_cov / mom.grad_sq, nan_r)
        b_simple = torch.where(b_simple < 0, torch.full_like(b_simple, float("inf")), b_simple)
        low, high = fieller_band(mom.trace_cov, mom.grad_sq, mom.var_trace_cov, mom.var_grad_sq, mom.cov, self._z)
        low = torch.where(defined, low, nan_r)
        high = torch.where(defined, high, nan_r)
        raw_ok = mask & (grad_sq_raw > 0)
        b_raw = torch.where(
            raw_ok, trace_cov_raw / torch.where(raw_ok, grad_sq_raw, torch.ones_like(grad_sq_raw)), nan_r
        )
        g_raw = torch.where(finite, grad_sq_raw, nan_r)
        t_raw = torch.where(finite, trace_cov_raw, nan_r)
        table = torch.stack([b_simple, low, high, b_raw, mom.grad_sq, mom.trace_cov, g_raw, t_raw], dim=1)
        flags = torch.stack([nonfinite_step.to(torch.int64), (~mask[0]).to(torch.int64), self._skipped])
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

    def _unscale(self, small: torch.Tensor, big: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return small, big
        inv_s2 = scaler._scale.to(device=small.device, dtype=torch.float64).reciprocal().square()
        # Hooks saw gradients at the loss scale; p.grad is still scaled unless unscale_() already ran.
        return small * inv_s2, (big if _already_unscaled(scaler) else big * inv_s2)

    def _layout_for(self, collector: Collector) -> _Layout:
        if self._layout is None:
            self._layout = _Layout([n for n, _ in collector.params], self.per_layer)
            saved = getattr(self, "_saved_rows", None)
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
        self._owner = torch.tensor(owner, dtype=torch.long)
        self.n_rows = 1 + len(self.layer_names) + len(self.module_names)
        self.row_names = ["total", *self.layer_names, *(f"module:{m}" for m in self.module_names)]

    def rows(self, per_param: torch.Tensor) -> torch.Tensor:
        """``(2, P)`` per-parameter sums -> ``(2, R)`` rows (total, parameters, modules)."""
        total = per_param.sum(dim=1, keepdim=True)
        if not self.per_layer:
            return total
        owner = self._owner.to(per_param.device)
        mods = torch.zeros(2, len(self.module_names), dtype=per_param.dtype, device=per_param.device)
        mods.index_add_(1, owner, per_param)
        return torch.cat([total, per_param, mods], dim=1)


def _big_sq_norms(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """``|p.grad|^2`` per parameter (zero where a parameter got no gradient), as float64 ``(P,)``."""
    grads = [p.grad for p in params]
    present = [g for g in grads if g is not None]
    if not present:
        return torch.zeros(len(params), dtype=torch.float64, device=device)
    norms = torch._foreach_norm([g.detach() for g in present])  # one fused kernel where supported
    sq = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]).square()
    if len(present) == len(grads):
        return sq
    out = torch.zeros(len(params), dtype=torch.float64, device=device)
    out[torch.tensor([i for i, g in enumerate(grads) if g is not None], device=device)] = sq
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
