"""What ``monitor.step(groups=..., example_ids=...)`` adds to a measurement: each group's noise, each example's score.

Numbers are Python floats (``None`` where undefined), built when first read, like the rest of a ``Measurement``.
A shared leaf without torch at import: the run store and the command line read ``GROUP_FIELDS`` from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["GROUP_FIELDS", "ExampleScores", "GroupMeasurement"]

GROUP_FIELDS = (
    "share",
    "share_low",
    "share_high",
    "share_raw",
    "b_simple",
    "b_simple_low",
    "b_simple_high",
    "b_simple_raw",
    "grad_sq",
    "trace_cov",
    "grad_sq_raw",
    "trace_cov_raw",
    "alignment",
    "alignment_low",
    "alignment_high",
    "alignment_raw",
)
"""The numbers of one group at one step, in order (the columns of ``estimators.groups``' tables)."""


def _clean(v: float) -> float | None:
    return None if math.isnan(v) else v


@dataclass(frozen=True)
class GroupMeasurement:
    """One group of examples (a data source) at one step: its part of the noise, its own noise scale, its direction.

    Every smoothed value ``x`` comes with its band ``[x_low, x_high]`` and this step's raw value ``x_raw``.  See
    ``docs/sources.md`` and ``noisescale.estimators.groups`` for the definitions.

    Attributes:
        examples: the group's examples in this step (all micro-batches, all ranks).
        share: its share of ``tr(Sigma)``: the spread of its examples' gradients about the batch's mean gradient,
            over the whole batch's (in [0, 1], the groups' shares sum to 1).
        b_simple: the group's own noise scale ``tr(Sigma_s) / |G_s|^2``, as if it were trained on alone.
        grad_sq, trace_cov: its mean gradient's squared norm ``|G_s|^2`` and its per-example ``tr(Sigma_s)``.
        alignment: cosine between its mean gradient and the whole batch's (1: it pulls the same way).
    """

    examples: int
    share: float | None
    share_low: float | None
    share_high: float | None
    share_raw: float | None
    b_simple: float | None
    b_simple_low: float | None
    b_simple_high: float | None
    b_simple_raw: float | None
    grad_sq: float | None
    trace_cov: float | None
    grad_sq_raw: float | None
    trace_cov_raw: float | None
    alignment: float | None
    alignment_low: float | None
    alignment_high: float | None
    alignment_raw: float | None

    @classmethod
    def from_row(cls, examples: int, row: Sequence[float]) -> GroupMeasurement:
        """From the ``GROUP_FIELDS`` numbers (NaN for undefined); a value outside its band is undefined, with its band
        (the invariant the monitor's own value keeps)."""
        values = [_clean(float(v)) for v in row]
        for i in (0, 4, 12):  # share, b_simple, alignment: a defined value always lies in its band
            v, low, high = values[i : i + 3]
            if v is None or low is None or high is None or not (low <= v <= high):
                values[i : i + 3] = [None, None, None]
        return cls(examples, *values)

    def to_dict(self) -> dict[str, float | int | None]:
        return {"examples": self.examples, **{f: getattr(self, f) for f in GROUP_FIELDS}}


class ExampleScores:
    """Each example's squared gradient norm in one step (the "GraNd" score of data-pruning work).

    ``scores[i]`` is ``|g_i|^2``, the squared norm of example ``ids[i]``'s own loss gradient over the measured
    parameters, in the same units as the monitor's ``tr(Sigma)``; ``groups[i]`` its group when ``groups=`` was
    passed.  Held as tensors until read.
    """

    def __init__(
        self, ids: torch.Tensor, scores: torch.Tensor | Callable[[], torch.Tensor], groups: torch.Tensor | None
    ) -> None:
        self._ids = ids
        self._scores = scores
        self._groups = groups

    def __len__(self) -> int:
        return int(self._ids.numel())

    @property
    def ids(self) -> list[int]:
        return [int(v) for v in self._ids.tolist()]

    @property
    def scores(self) -> list[float]:
        s = self._scores() if callable(self._scores) else self._scores
        return [float(v) for v in s.detach().cpu().double().tolist()]

    @property
    def groups(self) -> list[int] | None:
        return None if self._groups is None else [int(v) for v in self._groups.tolist()]

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "scores": self.scores, "groups": self.groups}

    def __repr__(self) -> str:
        return f"ExampleScores({len(self)} examples)"
