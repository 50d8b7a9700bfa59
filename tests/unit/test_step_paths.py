"""The host path (floats, row by row) and the device path (vectorised tensors) give the same numbers."""

import math

import pytest
import torch

from noisescale.estimators.scalar import RowState
from noisescale.estimators.smoothing import decay_for, ema_init
from noisescale.estimators.step import StepConstants, device_step, host_step, rows_to_state, state_to_rows


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-9, abs=1e-300)


def test_host_and_device_paths_agree_step_by_step():
    gen = torch.Generator().manual_seed(0)
    rows, steps, z = 6, 40, 1.645
    host = tuple(RowState() for _ in range(rows))
    dev = ema_init(rows)
    host_skipped, dev_skipped = 0, torch.zeros((), dtype=torch.int64)
    for step in range(steps):
        batch = int(torch.randint(16, 128, (1,), generator=gen))
        small = torch.rand(rows, generator=gen, dtype=torch.float64) * batch * 3
        big = torch.rand(rows, generator=gen, dtype=torch.float64)
        small[3] = big[3] = 0.0  # a row without signal
        if step == 7:
            small[0] = float("nan")  # a non-finite step
        if step == 11:
            small[0] = float("inf")
        c = StepConstants(
            n_small=batch,
            inv_size_sum=float(batch),
            batch_size=batch,
            beta=decay_for(batch, 500.0),
            z=z,
            defined=step != 15,
        )
        h = host_step(host, small.tolist(), big.tolist(), c, skipped=host_skipped)
        d = device_step(dev, small, big, c, skipped=dev_skipped)
        host, dev, host_skipped, dev_skipped = h.state, d.state, h.skipped, d.skipped
        h_table, d_table = h.table(), d.table().tolist()
        for hr, dr in zip(h_table, d_table):
            assert all(_same(a, b) for a, b in zip(hr, dr)), (step, hr, dr)
        assert list(h.flags()) == d.flags().tolist()
    assert host_skipped == int(dev_skipped) == 2


def test_state_conversion_round_trips():
    rows = (RowState(1.0, 0.5, 2.0, 3.0, 4.0, 5.0, 6.0, 3.0), RowState())
    assert state_to_rows(rows_to_state(rows)) == rows
