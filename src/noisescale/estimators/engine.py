"""``StepEngine``: the estimator across steps, on the host or on the device, chosen once from where the sums are.

Per step it turns the per-parameter small- and big-batch sums into rows (``rows.RowLayout``), runs the two-batch
estimate and the smoothing (``step``), and hands back thunks that build the measurement's table when a number is
first read.  Sums in host memory take the float path (``host_step``), which on a CPU is several times cheaper than
a hundred tiny tensor operations; sums on an accelerator take the vectorised path (``device_step``), which never
synchronises.  Both compute the same numbers (a test holds them to each other), and the smoothing state moves
between them when the sums do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from noisescale.estimators.rows import RowLayout
from noisescale.estimators.scalar import RowState
from noisescale.estimators.smoothing import EMAState, ema_init
from noisescale.estimators.step import (
    StepConstants,
    device_step,
    host_step,
    host_table,
    rows_to_state,
    state_to_rows,
)
from noisescale.estimators.summary import summary_table
from noisescale.stats import ParamSums

__all__ = ["Path", "StepEngine", "StepOutput"]

Path = Literal["auto", "host", "device"]


@dataclass(frozen=True)
class StepOutput:
    """What one step leaves for its ``Measurement``: thunks that read the numbers, on first use.

    Attributes:
        table: builds the ``(R, 8)`` rows of ``noisescale.types.COLUMNS`` as Python floats (one host copy).
        flags: builds ``[skipped this step, undefined this step, steps skipped so far]``.
    """

    table: Callable[[], Sequence[list[float]]]
    flags: Callable[[], list[int]]


class StepEngine:
    """The smoothing state of every row, and one step's estimate on the path the sums call for.

    Args:
        z: the normal quantile of the band's confidence (``band.z_for``).
        path: ``"auto"`` (host floats when both sums live in host memory, else tensors on their device), or force
            ``"host"`` / ``"device"`` (tests hold the two paths to each other).
    """

    def __init__(self, z: float, *, path: Path = "auto") -> None:
        self.z = z
        self.path: Path = path
        self._state: EMAState | tuple[RowState, ...] | None = None
        self._skipped: torch.Tensor | int = 0

    @property
    def skipped(self) -> int:
        """Steps skipped so far for non-finite statistics (reads the device on the tensor path)."""
        return int(self._skipped)

    def step(self, layout: RowLayout, small: ParamSums, big: ParamSums, c: StepConstants) -> StepOutput:
        """Fold one step into the state; see ``step.device_step`` for what is skipped or left out."""
        host = self._host(small, big)
        if host:
            # Host path: a handful of floats per row beats a hundred tiny tensor operations.
            result = host_step(
                self._host_state(layout),
                layout.host_rows(small.floats()),
                layout.host_rows(big.floats()),
                c,
                skipped=int(self._skipped),
            )
            self._state, self._skipped = result.state, result.skipped
            table_of_host = cast(Callable[[], Sequence[list[float]]], result.table)
            host_flags = cast(Callable[[], list[int]], result.flags)
            return StepOutput(table=table_of_host, flags=host_flags)
        device = small.device if not small.on_host else big.device
        rows = layout.rows(torch.stack([small.tensor(device), big.tensor(device).to(device)]))  # (2, R)
        result = device_step(
            self._device_state(layout, rows.device),
            rows[0],
            rows[1],
            c,
            skipped=torch.as_tensor(self._skipped, dtype=torch.int64).to(rows.device),
        )
        self._state, self._skipped = result.state, result.skipped
        table = cast(Callable[[], torch.Tensor], result.table)
        flags = cast(Callable[[], torch.Tensor], result.flags)
        # The single host sync of a measurement: one small copy, only when a number is read.
        return StepOutput(
            table=lambda: table().detach().to("cpu", torch.float64).tolist(),
            flags=lambda: flags().to("cpu").tolist(),
        )

    def current(self, layout: RowLayout) -> StepOutput:
        """The table of the state as it stands, no step folded in (raw columns NaN): what a restored monitor shows
        for the steps its cadence leaves out before it measures again."""
        state, nan = self._state, float("nan")
        skipped = int(self._skipped)
        if isinstance(state, EMAState):
            n = state.n.shape[0]
            raw = torch.full((n,), nan, dtype=state.sums.dtype, device=state.sums.device)
            used = torch.zeros(n, dtype=torch.bool, device=state.sums.device)
            frozen = state
            return StepOutput(
                table=lambda: summary_table(frozen, raw, raw, used, self.z).detach().to("cpu", torch.float64).tolist(),
                flags=lambda: [0, 0, skipped],
            )
        rows = self._host_state(layout)
        n_rows = len(rows)
        return StepOutput(
            table=lambda: cast(
                Sequence[list[float]], host_table(rows, [(nan, nan)] * n_rows, [False] * n_rows, self.z)
            ),
            flags=lambda: [0, 0, skipped],
        )

    def state_dict(self) -> dict[str, Any]:
        """The smoothing state (tensors on the host path too) and the skipped count."""
        state = self._state
        if isinstance(state, tuple):
            state = rows_to_state(state)
        return {"ema": None if state is None else state.state_dict(), "skipped": int(self._skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self._state = None if state["ema"] is None else EMAState.from_state_dict(state["ema"])
        self._skipped = int(state["skipped"])

    # -- internals ---------------------------------------------------------------------------------------------

    def _host(self, small: ParamSums, big: ParamSums) -> bool:
        if self.path != "auto":
            return self.path == "host"
        return small.device.type == "cpu" and big.device.type == "cpu"

    def _host_state(self, layout: RowLayout) -> tuple[RowState, ...]:
        state = self._state
        if isinstance(state, EMAState):  # loaded from a state_dict, or moved from a device
            state = state_to_rows(state)
        if state is None or len(state) != layout.n_rows:
            state = tuple(RowState() for _ in range(layout.n_rows))
        return state

    def _device_state(self, layout: RowLayout, device: torch.device) -> EMAState:
        state = self._state
        if isinstance(state, tuple):
            state = rows_to_state(state, device=device)
        if state is None or state.n.shape[0] != layout.n_rows:
            state = ema_init(layout.n_rows, device=device)
        if state.n.device != device:
            state = EMAState(sums=state.sums.to(device), n=state.n.to(device))
        return state
