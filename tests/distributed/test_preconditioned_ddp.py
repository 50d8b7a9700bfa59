"""The preconditioned noise scale under DDP (2 CPU processes, gloo): the rank source and the micro-batch source
give, on every rank alike, the two-batch estimate of the gradients divided by Adam's divisor, recomputed here."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed
from dist_scenarios import explicit_grads
from precond_scenarios import MICRO, STEPS, precond_worker

from noisescale.preconditioner import WARMUP_STEPS

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(200),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD = 2


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(precond_worker, world=WORLD, timeout=180)


def _reference(records: list[list[dict[str, Any]]], step: int, per_rank: int) -> tuple[float, float]:
    """``(|G|^2, tr(Sigma))`` of the gradients divided by ``d``, from each small batch's explicit gradient."""
    state, d = records[0][step]["state"], records[0][step]["d"]
    names = list(state)
    small = []
    for rank in range(WORLD):
        rec = records[rank][step]
        small += [explicit_grads(state, x, y) for x, y in zip(rec["x"].chunk(per_rank), rec["y"].chunk(per_rank))]
    k = len(small)
    big = [sum(g[i] for g in small) / k for i in range(len(names))]
    small_sq = [sum(float(((g[i] / d[n]) ** 2).sum()) for i, n in enumerate(names)) for g in small]
    big_sq = sum(float(((big[i] / d[n]) ** 2).sum()) for i, n in enumerate(names))
    total = sum(int(records[r][step]["x"].shape[0]) for r in range(WORLD))
    b = total / k
    mean_small = sum(small_sq) / k
    return (total * big_sq - b * mean_small) / (total - b), (mean_small - big_sq) / (1 / b - 1 / total)


@pytest.mark.parametrize(("source", "per_rank"), [("rank", 1), ("microbatch", MICRO)])
def test_each_source_gives_the_reference_on_every_rank(runs, source, per_rank):
    records = [runs[r][source] for r in range(WORLD)]
    for step in range(STEPS):
        pre = [records[r][step]["m"]["preconditioned"] for r in range(WORLD)]
        assert pre[0] == pre[1]  # the same numbers on every rank, bit for bit
        if step < WARMUP_STEPS:
            assert pre[0]["status"] == "undefined"
            continue
        grad_sq, trace = _reference(records, step, per_rank)
        assert math.isclose(pre[0]["grad_sq_raw"], grad_sq, rel_tol=1e-9), (pre[0]["grad_sq_raw"], grad_sq)
        assert math.isclose(pre[0]["trace_cov_raw"], trace, rel_tol=1e-9), (pre[0]["trace_cov_raw"], trace)
    plain = records[0][-1]["m"]
    assert not math.isclose(plain["trace_cov_raw"], records[0][-1]["m"]["preconditioned"]["trace_cov_raw"])


def test_the_divisor_is_the_same_on_every_rank(runs):
    for name, d in runs[0]["rank"][-1]["d"].items():
        assert torch.equal(d, runs[1]["rank"][-1]["d"][name])


def test_a_rank_that_cannot_precondition_a_step_gives_an_error_everywhere_not_a_broken_collective(runs):
    # the rank's NaNs keep the gathered vectors the same length; the plain check then names the layout
    assert [runs[r]["uneven"] for r in range(WORLD)] != ["no error"] * WORLD
    assert all(
        runs[r]["uneven"].startswith("StepError") and "small batches differ" in runs[r]["uneven"] for r in range(WORLD)
    )
