"""What ``GNSMonitor.step()`` returns: a measurement of the gradient noise scale, whole-model and per layer.

A ``Measurement`` holds its numbers as one small device tensor and turns them into Python floats only when one
is read, so a training loop that does not look at every step pays no host synchronisation for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from noisescale.group_types import ExampleScores, GroupMeasurement

from noisescale.columns import COLUMNS, PRECONDITIONED, RowsView

__all__ = ["COLUMNS", "PRECONDITIONED", "LayerMeasurement", "Measurement", "Status"]

Status = Literal["ok", "skipped", "undefined", "unmeasured"]


def _clean(v: float) -> float | None:
    return None if math.isnan(v) else v


_NAN = float("nan")
_NO_SIGNAL = "this step's gradients are all zero: there is no signal to measure"
_ZERO_SIGNAL = "no B_simple yet: the smoothed |G|^2 is exactly zero"
_BROKEN_BAND = (
    "the smoothed |G|^2 is negative beyond its own noise, so no B_simple agrees with the data (the gradient noise "
    "is far above the signal, or the statistics drift faster than the half-life): more examples per step or a "
    "longer halflife bring it back"
)


def _band_broken(row: Sequence[float]) -> bool:
    """Whether a row breaks ``b_simple_low <= b_simple <= b_simple_high`` (a defined value outside its band)."""
    b, low, high = row[0], row[1], row[2]
    if math.isnan(b):
        return False
    return not (low <= b <= high)  # NaN ends compare false: broken as well


def _without_band(row: Sequence[float]) -> list[float]:
    """The row with B_simple and its band undefined; the components stay (they are what the data say)."""
    return [_NAN, _NAN, _NAN, *row[3:]]


_RAW_COLUMNS = (3, 6, 7)  # b_simple_raw, grad_sq_raw, trace_cov_raw: this step alone


class _CarriedRows(RowsView):
    """The rows of an unmeasured step: the last measurement's smoothed values and band, no raw values.

    Lazy like the rows it wraps: reading the total does not summarise every layer.
    """

    def __init__(self, rows: Sequence[list[float]]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, i: int) -> list[float]:
        row = list(self._rows[i])
        for c in _RAW_COLUMNS:
            row[c] = _NAN
        return row


@dataclass(frozen=True)
class LayerMeasurement:
    """The noise scale of one parameter tensor or one module (smoothed, with band, and this step's raw value).

    Attributes:
        b_simple: smoothed ``tr(Sigma) / |G|^2``; ``None`` while undefined (no signal yet, zero gradient).
        b_simple_low, b_simple_high: the uncertainty band (``0`` and ``inf`` when the data cannot bound it).
        b_simple_raw: this step alone (noisy, biased); ``None`` where its ``|G|^2`` estimate is not positive.
        grad_sq, trace_cov: smoothed unbiased ``|G|^2`` and ``tr(Sigma)``.
        grad_sq_raw, trace_cov_raw: this step's unbiased estimates (``|G|^2`` may be negative).
    """

    b_simple: float | None
    b_simple_low: float | None
    b_simple_high: float | None
    b_simple_raw: float | None
    grad_sq: float | None
    trace_cov: float | None
    grad_sq_raw: float | None
    trace_cov_raw: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {c: getattr(self, c) for c in COLUMNS}


class Measurement:
    """One optimizer step's measurement.  Reading any number synchronises with the device once.

    Attributes:
        step: optimizer steps measured so far, this one included.
        examples: examples seen so far, this step included.
        batch_size: examples in this step (all micro-batches, all ranks).
        source: the collector that produced it (``"example"``, ``"microbatch"``, ``"rank"``).
        coverage: fraction of trainable parameter entries the measurement covers.
        b_simple, b_simple_low, b_simple_high, b_simple_raw, grad_sq, trace_cov, grad_sq_raw, trace_cov_raw:
            whole-model values, as in ``LayerMeasurement``.
        layers: per parameter tensor (``"encoder.0.weight"``), empty unless ``per_layer``.
        modules: the same grouped per module (``"encoder.0"``).
        status: ``"ok"``; ``"skipped"`` when the step had a non-finite gradient or statistic and was left out of
            the averages; ``"undefined"`` when it carried no signal (zero gradient), too few small batches, or
            B_simple has no value consistent with its band (``undefined_reason`` says which); ``"unmeasured"``
            when the monitor's cadence (``every=``, ``budget=``) left this step out: the smoothed values and the
            band are then those of the last measurement (``last``, from step ``measured_step``), and the raw
            values, which would be this step's alone, are ``None``.  Whenever ``b_simple`` is a number,
            ``b_simple_low <= b_simple <= b_simple_high`` holds, for every layer too.
        skipped_steps: steps skipped so far for non-finite values.
        wall_time: Unix time the step was measured (for an unmeasured step: when ``step()`` returned it).
        groups: with ``step(groups=ids)``, each group's noise (``GroupMeasurement``) by id; empty otherwise or when
            ``groups_reason`` says why not.
        example_scores: with ``step(example_ids=ids)`` on a sampled step, each example's squared gradient norm.
        preconditioned: with ``GNSMonitor(precondition=optimizer)``, the same measurement of Adam's preconditioned
            gradients (``noisescale.preconditioner``), with its own status, band and layers; ``None`` otherwise.
        b_precond, b_precond_low, b_precond_high, b_precond_raw: its whole-model values (``None`` while it is
            undefined); reading them without ``precondition=`` raises ``AttributeError``, so a controller told
            to follow ``"b_precond"`` says what is missing instead of holding forever.
    """

    def __init__(
        self,
        *,
        table: Callable[[], Sequence[list[float]]],
        flags: Callable[[], Sequence[int]],
        layer_names: Sequence[str],
        module_names: Sequence[str],
        step: int,
        examples: int,
        batch_size: int,
        source: str,
        coverage: float,
        undefined_reason: str | None = None,
        wall_time: float | None = None,
        last: Measurement | None = None,
    ) -> None:
        self._last = last  # the measurement an unmeasured step carries; None: this one was measured
        self._table = table
        self._flags = flags
        self._layer_names = tuple(layer_names)
        self._module_names = tuple(module_names)
        self._rows: Sequence[list[float]] | None = None
        self._status: Status | None = None
        self._skipped = 0
        self.step = step
        self.examples = examples
        self.batch_size = batch_size
        self.source = source
        self.coverage = coverage
        self.undefined_reason = undefined_reason
        self.wall_time = time.time() if wall_time is None else wall_time
        self._layers: dict[str, LayerMeasurement] | None = None
        self._modules: dict[str, LayerMeasurement] | None = None
        self._groups: Callable[[], Mapping[int, GroupMeasurement]] | Mapping[int, GroupMeasurement] = {}
        self.groups_reason: str | None = None
        self.example_scores: ExampleScores | None = None
        self.preconditioned: Measurement | None = None

    @classmethod
    def unmeasured(
        cls, last: Measurement, *, step: int, examples: int, batch_size: int, wall_time: float | None = None
    ) -> Measurement:
        """A step the monitor's cadence left out: ``last``'s smoothed values and band, no raw values.

        Reads nothing now: the numbers are ``last``'s, read (once, shared) when one of them is first read.
        """
        last = last.last  # always the measured one
        carried = cls(
            table=lambda: _CarriedRows(last._materialize()),
            flags=lambda: (0, 0, last.skipped_steps),
            layer_names=last._layer_names,
            module_names=last._module_names,
            step=step,
            examples=examples,
            batch_size=batch_size,
            source=last.source,
            coverage=last.coverage,
            wall_time=wall_time,
            last=last,
        )
        if last.preconditioned is not None:
            carried.preconditioned = cls.unmeasured(
                last.preconditioned, step=step, examples=examples, batch_size=batch_size, wall_time=wall_time
            )
        return carried

    @property
    def last(self) -> Measurement:
        """The measurement whose values this one shows: itself, or for an unmeasured step the last measured one."""
        return self if self._last is None else self._last

    @property
    def measured_step(self) -> int:
        """The step the values come from: ``step``, or for an unmeasured step the last measured one's."""
        return self.last.step

    def _materialize(self) -> Sequence[list[float]]:
        rows = self._rows
        if rows is None:
            # The single host sync of a measurement (on an accelerator), only when a number is read.  Two threads
            # may read at once (the sinks' thread and the training loop): everything is worked out first and the
            # rows, which say it is done, are published last.
            rows = self._table()
            nonfinite, undefined, skipped = self._flags()
            total = rows[0]
            reason = self.undefined_reason
            status: Status
            if self._last is not None:
                status = "unmeasured"
            elif nonfinite:
                status = "skipped"
            else:
                if undefined and reason is None:
                    reason = _NO_SIGNAL
                elif math.isnan(total[0]) and reason is None:
                    reason = _ZERO_SIGNAL
                elif _band_broken(total) and reason is None:
                    reason = _BROKEN_BAND
                status = "undefined" if reason is not None else "ok"
            self._skipped = int(skipped)
            self.undefined_reason = reason
            self._status = status
            self._rows = rows
        return rows

    def _checked(self, i: int) -> list[float]:
        """Row ``i`` with the band invariant applied (the one place it is checked)."""
        row = self._materialize()[i]
        return _without_band(row) if _band_broken(row) else row

    def _value(self, col: int) -> float | None:
        return _clean(self._checked(0)[col])

    @property
    def b_simple(self) -> float | None:
        """Whole-model ``b_simple`` (see ``LayerMeasurement``)."""
        return self._value(0)

    @property
    def b_simple_low(self) -> float | None:
        """Whole-model ``b_simple_low`` (see ``LayerMeasurement``)."""
        return self._value(1)

    @property
    def b_simple_high(self) -> float | None:
        """Whole-model ``b_simple_high`` (see ``LayerMeasurement``)."""
        return self._value(2)

    @property
    def b_simple_raw(self) -> float | None:
        """Whole-model ``b_simple_raw`` (see ``LayerMeasurement``)."""
        return self._value(3)

    @property
    def grad_sq(self) -> float | None:
        """Whole-model ``grad_sq`` (see ``LayerMeasurement``)."""
        return self._value(4)

    @property
    def trace_cov(self) -> float | None:
        """Whole-model ``trace_cov`` (see ``LayerMeasurement``)."""
        return self._value(5)

    @property
    def grad_sq_raw(self) -> float | None:
        """Whole-model ``grad_sq_raw`` (see ``LayerMeasurement``)."""
        return self._value(6)

    @property
    def trace_cov_raw(self) -> float | None:
        """Whole-model ``trace_cov_raw`` (see ``LayerMeasurement``)."""
        return self._value(7)

    def _preconditioned_value(self, col: int) -> float | None:
        pre = self.preconditioned
        if pre is None:
            raise AttributeError(
                f"this measurement has no preconditioned noise scale ({COLUMNS[col].replace('b_simple', 'b_precond')})"
                ": create the monitor with GNSMonitor(model, precondition=optimizer) to measure it"
            )
        return pre._value(col)

    @property
    def b_precond(self) -> float | None:
        """Smoothed B_simple of Adam's preconditioned gradients (``preconditioned.b_simple``)."""
        return self._preconditioned_value(0)

    @property
    def b_precond_low(self) -> float | None:
        """Lower end of ``b_precond``'s band."""
        return self._preconditioned_value(1)

    @property
    def b_precond_high(self) -> float | None:
        """Upper end of ``b_precond``'s band."""
        return self._preconditioned_value(2)

    @property
    def b_precond_raw(self) -> float | None:
        """This step's ``b_precond`` alone."""
        return self._preconditioned_value(3)

    def companion_metrics(self) -> dict[str, float | None]:
        """The values reported beside the measurement's own columns, by name: ``b_precond`` and its band and raw
        value with ``precondition=``, else nothing.  Sinks receive them as metrics of the same step."""
        if self.preconditioned is None:
            return {}
        return {name: self._preconditioned_value(i) for i, name in enumerate(PRECONDITIONED)}

    def _row(self, i: int) -> LayerMeasurement:
        return LayerMeasurement(*(_clean(v) for v in self._checked(i)))

    @property
    def total(self) -> LayerMeasurement:
        """The whole-model row."""
        return self._row(0)

    @property
    def status(self) -> Status:
        self._materialize()
        assert self._status is not None
        return self._status

    @property
    def skipped_steps(self) -> int:
        self._materialize()
        return self._skipped

    @property
    def layers(self) -> Mapping[str, LayerMeasurement]:
        if self._layers is None:
            self._layers = {n: self._row(1 + i) for i, n in enumerate(self._layer_names)}
        return self._layers

    @property
    def modules(self) -> Mapping[str, LayerMeasurement]:
        if self._modules is None:
            off = 1 + len(self._layer_names)
            self._modules = {n: self._row(off + i) for i, n in enumerate(self._module_names)}
        return self._modules

    @property
    def groups(self) -> Mapping[int, GroupMeasurement]:
        if callable(self._groups):
            self._groups = self._groups()
        return self._groups

    def set_groups(self, groups: Callable[[], Mapping[int, GroupMeasurement]] | None, reason: str | None) -> None:
        """Attach the groups' values (built when first read), or why there are none (``noisescale.group_stats``)."""
        self._groups = {} if groups is None else groups
        self.groups_reason = reason

    def to_dict(self, *, per_layer: bool = True) -> dict[str, Any]:
        """Plain Python values (JSON-ready; ``inf`` stays a float), for stores and sinks."""
        out: dict[str, Any] = {
            "step": self.step,
            "examples": self.examples,
            "batch_size": self.batch_size,
            "source": self.source,
            "coverage": self.coverage,
            "status": self.status,
            "skipped_steps": self.skipped_steps,
            **self.total.to_dict(),
        }
        if self._last is not None:
            out["measured_step"] = self.measured_step
        if per_layer:
            out["layers"] = {n: v.to_dict() for n, v in self.layers.items()}
            out["modules"] = {n: v.to_dict() for n, v in self.modules.items()}
        if self.groups:
            out["groups"] = {g: v.to_dict() for g, v in self.groups.items()}
        if self.example_scores is not None:
            out["example_scores"] = self.example_scores.to_dict()
        pre = self.preconditioned
        if pre is not None:
            out["preconditioned"] = {
                "status": pre.status,
                "undefined_reason": pre.undefined_reason,
                **pre.total.to_dict(),
            }
        return out

    def __repr__(self) -> str:
        t = self.total
        band = f"[{t.b_simple_low:.4g}, {t.b_simple_high:.4g}]" if t.b_simple_low is not None else "[?]"
        b = f"{t.b_simple:.4g}" if t.b_simple is not None else "undefined"
        return f"Measurement(step={self.step}, b_simple={b} {band}, status={self.status!r}, source={self.source!r})"
