"""A step-time model fitted from measured step times: ``t(b) = t0 + t1 * b`` for one pass of ``b`` examples.

``t0`` is what a pass costs whatever its size (kernel launches, the optimizer step, communication), ``t1`` what
each example adds.  On ``devices`` data-parallel workers with at most ``micro_batch`` examples per pass, an
optimizer step of ``B`` examples gives each worker ``B / devices`` examples in ``ceil(B / (devices * micro_batch))``
passes, so it takes ``passes * t0 + t1 * B / devices`` seconds.  A straight line is crude (a device that is not
yet saturated runs a bigger pass almost for free), which is why it is fitted from the user's own numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from noisescale.errors import ConfigError

__all__ = ["StepTime"]


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step as a function of its batch size.

    Attributes:
        t0: seconds of one pass that do not depend on its size.
        t1: seconds per example of a pass.
        devices: data-parallel workers sharing each step's examples.
        micro_batch: the most examples one worker takes in one pass (``None``: no limit, one pass per step).
    """

    t0: float
    t1: float
    devices: int = 1
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("t0", "t1"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"StepTime: {name} must be a number of seconds >= 0, got {v!r}")
        if self.t0 == 0 and self.t1 == 0:
            raise ConfigError("StepTime: t0 and t1 are both 0; a step must take some time")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"StepTime: devices must be a positive integer, got {self.devices!r}")
        if self.micro_batch is not None and (
            isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) or self.micro_batch < 1
        ):
            raise ConfigError(f"StepTime: micro_batch must be a positive integer or None, got {self.micro_batch!r}")

    @classmethod
    def fit(
        cls, measured: Sequence[tuple[float, float]], *, devices: int = 1, micro_batch: int | None = None
    ) -> StepTime:
        """Least-squares line through ``(pass size, seconds)`` pairs, at least two distinct sizes.

        >>> StepTime.fit([(32, 0.012), (256, 0.040)])
        StepTime(t0=0.008, t1=0.000125, devices=1, micro_batch=None)
        """
        pts = [(float(b), float(s)) for b, s in measured]
        for b, s in pts:
            if not (math.isfinite(b) and b > 0 and math.isfinite(s) and s > 0):
                raise ConfigError(f"a measured step time needs a positive size and seconds, got ({b:g}, {s:g})")
        if len({b for b, _ in pts}) < 2:
            raise ConfigError(
                f"fitting t(b) = t0 + t1*b needs step times at two different sizes, got {len(pts)} measurement(s) "
                f"at sizes {sorted({b for b, _ in pts})}: time one step at a small and at a large micro-batch"
            )
        n = len(pts)
        mb = sum(b for b, _ in pts) / n
        ms = sum(s for _, s in pts) / n
        t1 = sum((b - mb) * (s - ms) for b, s in pts) / sum((b - mb) ** 2 for b, _ in pts)
        t0 = ms - t1 * mb
        if t1 < 0:
            raise ConfigError(
                f"the step times {pts} fall as the size grows (t1 = {t1:.3g} s per example): time more steps, "
                "or at sizes further apart"
            )
        if t0 < 0:
            # A size-independent cost within noise of zero: clip it rather than predict negative times.
            t0 = 0.0
        return cls(t0=round(t0, 12), t1=round(t1, 12), devices=devices, micro_batch=micro_batch)

    def passes(self, batch: float) -> int:
        """Passes per worker for an optimizer step of ``batch`` examples."""
        if self.micro_batch is None:
            return 1
        # A relative tolerance: a batch of exactly devices * micro_batch * a must not round up to a + 1.
        return max(1, math.ceil(batch / (self.devices * self.micro_batch) * (1 - 1e-12)))

    def seconds_per_step(self, batch: float) -> float:
        return self.passes(batch) * self.t0 + self.t1 * batch / self.devices

    def to_dict(self) -> dict[str, Any]:
        return {"t0": self.t0, "t1": self.t1, "devices": self.devices, "micro_batch": self.micro_batch}
