"""When the monitor measures: every step, one step in ``every``, or as often as a share of the training time allows.

A step the cadence leaves out is *unmeasured*: the collectors' hooks and the big-batch capture are disarmed for it
(they return before any tensor operation), ``monitor.step()`` only counts its examples and returns the last
measurement's values (``Measurement.unmeasured``).  The first step is always measured (the ``auto`` source
decides there, and the collectors check what they must see once).

* ``every=N``: steps ``1, 1 + N, 1 + 2N, ...``; deterministic.
* ``budget=f``: the cadence is chosen from the monitor's own cost, timed in place: the wall time from one
  ``monitor.step()`` to the next is a training step, measured or not, and the difference between the medians of
  recent measured and unmeasured steps is what a measurement costs (hooks, extra kernels, ``step()``), whatever
  the device.  The steady cadence is the one whose measurements cost ``f`` of the training time.  Within that
  budget, measurements are denser while B_simple moves (its smoothed value moved by more than half its band since
  the last decision, or the band is not bounded yet, as at the start): they may run ahead of the budget by the
  cost of ``BURST`` measurements, paid back at twice the steady cadence once B_simple settles or that credit is
  spent, so over a run the cost stays within ``f`` of the training time plus at most ``BURST + DECIDE_EVERY``
  measurements.  It never measures less often than ``PER_HALFLIFE`` times per smoothing half-life (``sparsest``,
  from the monitor): sparser, each new raw estimate would weigh a third or more of the smoothed value, which then
  wanders with it.  Where the budget alone would go sparser than that (a step so short that the monitor's
  bookkeeping of the unmeasured steps is already most of ``f``), the half-life wins and the cadence event says
  so: the budget is then exceeded, by the cost of those measurements.

Every rank must measure the same steps (the statistics are summed over the ranks at each measured step).  A fixed
``every`` is the same everywhere; under ``budget=`` each rank times its own steps, so rank 0 decides and its choice
is broadcast to the others (``agree``), at the same measured steps on every rank: once every ``DECIDE_EVERY``
measurements.  Each chosen cadence is returned to the monitor, which records it as a ``"cadence"`` event.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noisescale.errors import ConfigError

__all__ = [
    "BURST",
    "DECIDE_EVERY",
    "MAX_EVERY",
    "PER_HALFLIFE",
    "WARMUP_EVERY",
    "BudgetInputs",
    "Cadence",
    "budget_every",
]

MAX_EVERY = 1000
"""The sparsest cadence the budget chooses (the smoothing needs measurements to average)."""
PER_HALFLIFE = 2
"""The fewest measurements per smoothing half-life the budget makes (each weighs at most about 30%)."""
DECIDE_EVERY = 4
"""Measured steps between two decisions of the budget."""
WARMUP_EVERY = 2
"""The budget's cadence until both kinds of steps have been timed: every other step."""
BURST = 16.0
"""Measurements' worth of cost by which the budget may run ahead while B_simple moves."""
_MIN_SAMPLES = 3  # timed steps of each kind before the first decision
_MEASURED_WINDOW = 16
_UNMEASURED_WINDOW = 64


@dataclass(frozen=True)
class BudgetInputs:
    """What one decision of the budget is made from (rank 0's timings, seconds).

    Attributes:
        measure_cost: what a measured step costs more than an unmeasured one.
        plain: an unmeasured step, less the monitor's own time in it.
        unmeasured_cost: the monitor's own time in an unmeasured step (``step()`` only; the disarmed hooks are
            too cheap to time).
        credit: the budget's share of the training time so far, less the estimated cost of its measurements
            (negative: ahead of the budget).
        moving: B_simple moved since the last decision, or its band is not bounded yet.
    """

    measure_cost: float
    plain: float
    unmeasured_cost: float
    credit: float
    moving: bool


def budget_every(budget: float, x: BudgetInputs, sparsest: int = MAX_EVERY) -> int:
    """The cadence for the next ``DECIDE_EVERY`` measurements (pure).

    The steady cadence ``N`` spends ``budget`` of the training time: ``(c + (N - 1) u) / (N p) = budget`` with
    ``c`` the cost of a measurement, ``u`` that of an unmeasured step and ``p`` a plain step.  While B_simple moves
    and the credit lasts (down to ``-BURST c``) it is a quarter of that; otherwise, while the measurements are
    ahead of the budget, twice that, which pays back what was run ahead.  Never above ``sparsest`` (nor
    ``MAX_EVERY``).
    """
    c, p, u = max(x.measure_cost, 0.0), max(x.plain, 1e-12), max(x.unmeasured_cost, 0.0)
    affordable = budget * p - u
    if affordable <= 0.0:
        steady = float(MAX_EVERY)
    else:
        steady = max(c - u, 0.0) / affordable
    if x.moving and x.credit > -BURST * c:
        n = steady / 4.0
    elif x.credit < 0.0:  # ahead of the budget: pay back at half its rate
        n = 2.0 * steady
    else:
        n = steady
    return int(min(max(math.ceil(n - 1e-9), 1), MAX_EVERY, max(sparsest, 1)))


class Cadence:
    """Which steps the monitor measures: a fixed ``every``, or one chosen within ``budget``.

    Args:
        every: measure one step in ``every`` (the first one included).
        budget: instead, the share of the training time the measurements may cost (e.g. ``0.03``).
        agree: under data parallelism, broadcasts rank 0's choice (an ``int``) to every rank; ``None`` alone.
        is_rank0: whether this process decides (rank 0, or the only process).
        clock: seconds, monotonic (tests pass their own).

    Raises:
        ConfigError: for an ``every`` that is not a positive int or a ``budget`` outside ``(0, 1)``, or both.
    """

    def __init__(
        self,
        every: int = 1,
        budget: float | None = None,
        *,
        agree: Callable[[int], int] | None = None,
        is_rank0: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a positive int (measure one step in every), got {every!r}")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0:
                raise ConfigError(
                    f"budget must be a share of the training time in (0, 1), e.g. budget=0.03, got {budget!r}"
                )
            if every != 1:
                raise ConfigError(
                    f"pass either every={every} (a fixed cadence) or budget={budget} (a cadence chosen from the "
                    "monitor's cost), not both"
                )
        self.budget = None if budget is None else float(budget)
        self.every = WARMUP_EVERY if budget is not None else every
        self.next_due = 1  # the first step is always measured
        self.measured = 0  # measured steps so far
        self._agree = agree
        self._is_rank0 = is_rank0
        self._clock = clock
        self._last_tick: float | None = None
        self._times: dict[bool, deque[float]] = {
            True: deque(maxlen=_MEASURED_WINDOW),
            False: deque(maxlen=_UNMEASURED_WINDOW),
        }
        self._inside: deque[float] = deque(maxlen=_UNMEASURED_WINDOW)  # step() of unmeasured steps
        self._elapsed = 0.0
        self._counts = {True: 0, False: 0}  # timed steps of each kind
        self._b_before: float | None = None
        self.inputs: BudgetInputs | None = None  # what the last decision was made from (diagnostics)
        self.sparsest = MAX_EVERY  # the monitor sets it from the smoothing half-life
        self.capped = False  # the last choice was held down to ``sparsest``

    @property
    def adaptive(self) -> bool:
        """Whether the cadence is chosen from the monitor's cost (``budget=``)."""
        return self.budget is not None

    @property
    def initial(self) -> int | None:
        """The cadence to record before the first step, or ``None`` for the default of every step."""
        return self.every if (self.adaptive or self.every != 1) else None

    def due(self, step: int) -> bool:
        """Whether step ``step`` (numbered from 1) is measured."""
        return step >= self.next_due

    def started(self) -> float:
        """Call at the start of ``monitor.step()``; returns the clock (for ``finished``)."""
        return self._clock()

    def finished(self, step: int, measured: bool, started: float, read: Callable[[], tuple[Any, ...]]) -> int | None:
        """Call at the end of ``monitor.step()`` of step ``step``.

        Args:
            step: the step just recorded.
            measured: whether it was measured.
            started: ``started()`` at the beginning of that ``step()``.
            read: returns the smoothed ``(b_simple, low, high)`` of the last measurement (reads the device: only
                called by the budget, once per decision).

        Returns:
            A newly chosen cadence (to record), or ``None`` when it did not change.
        """
        if measured:
            self.measured += 1
        chosen = None
        if self.adaptive:
            now = self._clock()
            if self._last_tick is not None:
                interval = now - self._last_tick
                self._times[measured].append(interval)
                self._counts[measured] += 1
                self._elapsed += interval
                if not measured:
                    self._inside.append(now - started)
            self._last_tick = now
            if measured and self.measured % DECIDE_EVERY == 0:
                chosen = self._decide(read)
        if measured:
            self.next_due = step + self.every
        return chosen

    def _decide(self, read: Callable[[], tuple[Any, ...]]) -> int | None:
        """Rank 0 chooses from its timings; every rank takes its choice (all of them call this together)."""
        every = self.every
        if self._is_rank0:
            every = self._choose(read)
        if self._agree is not None:
            every = int(self._agree(every))
        if every == self.every:
            return None
        self.every = every
        return every

    def _choose(self, read: Callable[[], tuple[Any, ...]]) -> int:
        measured, unmeasured = self._times[True], self._times[False]
        if len(measured) < _MIN_SAMPLES or len(unmeasured) < _MIN_SAMPLES:
            return self.every
        inside = statistics.median(self._inside) if self._inside else 0.0
        step_plain = statistics.median(unmeasured)
        cost = max(statistics.median(measured) - step_plain, 0.0)
        spent = cost * self._counts[True] + inside * self._counts[False]
        assert self.budget is not None
        b, low, high = read()
        moving = True
        if b is not None and low is not None and high is not None and math.isfinite(high) and self._b_before:
            moving = abs(b - self._b_before) > (high - low) / 2.0
        self._b_before = b if b is not None and math.isfinite(b) else None
        self.inputs = BudgetInputs(
            measure_cost=cost,
            plain=step_plain - inside,
            unmeasured_cost=inside,
            credit=self.budget * self._elapsed - spent,
            moving=moving,
        )
        every = budget_every(self.budget, self.inputs, self.sparsest)
        self.capped = every < budget_every(self.budget, self.inputs)
        return every

    def state_dict(self) -> dict[str, Any]:
        """The cadence and where it stands (timings are not kept: they belong to the machine that made them)."""
        return {"every": self.every, "next_due": self.next_due, "measured": self.measured, "budget": self.budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a budget starts timing afresh, at the saved cadence."""
        if state.get("budget") != self.budget:
            raise ConfigError(
                f"the loaded monitor state was saved with budget={state.get('budget')!r}, this monitor has "
                f"budget={self.budget!r}; construct it with the same cadence options"
            )
        if self.budget is None and state["every"] != self.every:
            raise ConfigError(
                f"the loaded monitor state was saved with every={state['every']}, this monitor has "
                f"every={self.every}; construct it with the same cadence options"
            )
        self.every = int(state["every"])
        self.next_due = int(state["next_due"])
        self.measured = int(state["measured"])
