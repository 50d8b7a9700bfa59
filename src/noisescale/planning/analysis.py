"""A run read and cut into stretches: what ``noisescale.planning.price`` turns into predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from noisescale.planning.model import Piece, recover
from noisescale.planning.stretches import Row, Stretch

__all__ = ["Analysis"]


@dataclass(frozen=True)
class Analysis:
    """A run read and cut into stretches, before any schedule is priced (the input of ``price``)."""

    run: dict[str, Any]
    rows: list[Row]
    stretches: list[Stretch]
    target_loss: float | None
    loss_window: float
    reached_loss: float | None
    wall_s: float | None
    coverage: float | None
    by_loss: list[dict[str, Any]]
    has_loss: bool

    @property
    def steps(self) -> int:
        return self.rows[-1].step if self.rows else 0

    @property
    def examples(self) -> int:
        return self.rows[-1].examples if self.rows else 0

    @property
    def measured(self) -> int:
        return sum(s.measured for s in self.stretches)

    def pieces(self, end: Literal["value", "low", "high"] = "value") -> list[Piece]:
        """One piece per recorded row, with its stretch's B_simple (or an end of its band) as B_noise."""
        out = []
        for s in self.stretches:
            b = {"value": s.b_simple, "low": s.b_simple_low, "high": s.b_simple_high}[end]
            b_noise = math.inf if b is None else b
            for r in self.rows[s.first_row : s.last_row + 1]:
                out.append(recover(r.steps, r.examples_taken, b_noise))
        return out
