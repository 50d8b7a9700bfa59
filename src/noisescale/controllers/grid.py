"""The batch sizes a setup allows: multiples of a quantum, or powers of two, between two bounds.

The quantum is ``micro_batch x world_size`` (one micro-batch on every rank), so every allowed batch splits into a
whole number of accumulation steps on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from noisescale.errors import ConfigError

__all__ = ["Grid", "Quantize"]

Quantize = Literal["multiple", "pow2"]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Grid:
    """Allowed batch sizes: ``quantize="multiple"`` (every multiple of ``quantum``) or ``"pow2"`` (powers of two,
    each a multiple of ``quantum``), from ``low`` to ``high`` inclusive.

    Raises:
        ConfigError: bounds outside the grid or in the wrong order, a quantum no power of two is a multiple of.
    """

    low: int
    high: int
    quantum: int = 1
    quantize: Quantize = "multiple"

    def __post_init__(self) -> None:
        if self.quantize not in ("multiple", "pow2"):
            raise ConfigError(f"quantize must be 'multiple' or 'pow2', got {self.quantize!r}")
        if self.low > self.high:
            raise ConfigError(
                f"min_batch must be <= max_batch, got min_batch={self.low} > max_batch={self.high}; swap them"
            )
        q = self.quantum
        if self.quantize == "pow2" and not _is_pow2(q):
            raise ConfigError(
                f"quantize='pow2' needs micro_batch x world_size to divide a power of two, got {q}: use a "
                "power-of-two micro_batch (and world_size), or quantize='multiple'"
            )
        for name, v in (("min_batch", self.low), ("max_batch", self.high)):
            if self.quantize == "pow2":
                if not _is_pow2(v) or v < q:
                    raise ConfigError(
                        f"{name}={v} is not an allowed batch: with quantize='pow2' it must be a power of two and at "
                        f"least micro_batch x world_size = {q}; use {name}={self.nearest_pow2(max(v, q))}"
                    )
            elif v % q:
                up = -(-v // q) * q
                raise ConfigError(
                    f"{name}={v} is not a multiple of micro_batch x world_size = {q}, so it cannot be split into "
                    f"whole micro-batches on every rank; use {name}={max(q, up)}"
                )

    @staticmethod
    def nearest_pow2(x: float) -> int:
        """The power of two nearest to ``x`` on a log scale."""
        return 1 << max(0, round(math.log2(max(x, 1.0))))

    def contains(self, b: int) -> bool:
        if not self.low <= b <= self.high:
            return False
        return _is_pow2(b) if self.quantize == "pow2" else b % self.quantum == 0

    def check(self, name: str, b: int) -> None:
        """Raise ``ConfigError`` naming the nearest allowed value unless ``b`` is allowed."""
        if not self.contains(b):
            raise ConfigError(
                f"{name}={b} is not an allowed batch size here ({self.describe()}); use {name}={self.nearest(b)}"
            )

    def describe(self) -> str:
        kind = "powers of two" if self.quantize == "pow2" else f"multiples of {self.quantum}"
        return f"{kind} from {self.low} to {self.high}"

    def nearest(self, x: float) -> int:
        """The allowed batch nearest to ``x`` (on a log scale for powers of two), clipped to the bounds."""
        if self.quantize == "pow2":
            b = self.nearest_pow2(x)
        else:
            b = max(1, round(x / self.quantum)) * self.quantum
        return min(max(b, self.low), self.high)

    def floor(self, x: float) -> int:
        """The largest allowed batch ``<= x`` (``low`` if none)."""
        if self.quantize == "pow2":
            b = 1 << max(0, math.floor(math.log2(max(x, 1.0)) + 1e-12))
        else:
            b = math.floor(x / self.quantum + 1e-12) * self.quantum
        return min(max(b, self.low), self.high)

    def ceil(self, x: float) -> int:
        """The smallest allowed batch ``>= x`` (``high`` if none)."""
        if self.quantize == "pow2":
            b = 1 << max(0, math.ceil(math.log2(max(x, 1.0)) - 1e-12))
        else:
            b = math.ceil(x / self.quantum - 1e-12) * self.quantum
        return min(max(b, self.low), self.high)

    def above(self, b: int) -> int:
        """The next allowed batch above ``b`` (``b`` itself at the top)."""
        return self.ceil(b + 1)
