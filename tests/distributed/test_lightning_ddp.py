"""Lightning's DDP strategy (2 gloo processes): both ranks measure the same, and what one process measures on the
global batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed
from torch.utils.data.distributed import DistributedSampler

pytest.importorskip("lightning.pytorch")
from lightning_scenarios import (
    CONTROLLER_ACCUMULATION,
    CONTROLLER_EPOCHS,
    LR,
    MICRO,
    SCENARIOS,
    N,
    lightning_worker,
)
from tests.helpers.frameworks import assert_same_series, plain_series, regression_data, tiny_net

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD = 2


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(lightning_worker, world=WORLD, timeout=240)


def _shards(epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's rows in the order Lightning's shuffled ``DistributedSampler`` (seed 0) deals them in ``epoch``;
    the order does not need a process group to be computed."""
    x, y = regression_data(n=N)
    dataset = torch.utils.data.TensorDataset(x, y)
    shards = []
    for r in range(WORLD):
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=r, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        order = list(sampler)
        shards.append((x[order], y[order]))
    return shards


def _global_steps(accumulation: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each step as one process sees it, rank r's rows as one small batch."""
    shards = _shards()
    rows_per_step = MICRO * accumulation
    steps = []
    for start in range(0, N // WORLD, rows_per_step):
        steps.append([(sx[start : start + rows_per_step], sy[start : start + rows_per_step]) for sx, sy in shards])
    return steps


def test_both_ranks_measure_the_same(runs):
    for name, *_ in SCENARIOS:
        assert runs[0][name]["rows"] == runs[1][name]["rows"], name
        assert len(runs[0][name]["rows"]) == N // (WORLD * MICRO * int(name[-1]))


@pytest.mark.parametrize("name, source, accumulation, clip", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_equal_to_one_process_on_the_global_batch(runs, name, source, accumulation, clip):
    got = runs[0][name]["rows"]
    steps = _global_steps(accumulation)
    if source == "example":  # per-example norms over the whole global batch, in one backward pass
        steps = [[(torch.cat([x for x, _ in s]), torch.cat([y for _, y in s]))] for s in steps]
        want, net = plain_series(tiny_net(), steps, lr=LR, clip=clip, source="example")
    else:  # the ranks are the small batches: one micro-batch per rank
        want, net = plain_series(tiny_net(), steps, lr=LR, clip=clip, source="microbatch")
    assert {r["source"] for r in got} == {"example" if source == "example" else "rank"}
    for r in want:
        r["source"] = got[0]["source"]
    assert_same_series(got, want, rel=1e-5)
    for a, b in zip(runs[0][name]["weights"], net.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_a_controller_decides_the_same_on_both_ranks_as_one_process_on_the_global_batch(runs):
    got = [runs[r]["controller"] for r in range(WORLD)]
    for key in ("rows", "events", "metrics", "state"):
        assert got[0][key] == got[1][key], key
    changes = [(step, d["before"]["accumulation"], d["after"]["accumulation"]) for _, _, step, d in got[0]["events"]]
    assert changes == [(2, 1, 2), (5, 2, 4)]  # the second decided at step 4, held there: not a safe point
    assert [r["batch_size"] for r in got[0]["rows"]] == [k * MICRO * WORLD for k in CONTROLLER_ACCUMULATION]
    # one process, per-example norms over each step's global batch (every rank's micro-batches), in one backward
    steps, accumulation = [], iter(CONTROLLER_ACCUMULATION)
    for epoch in range(CONTROLLER_EPOCHS):
        shards, done = _shards(epoch), 0
        while done < N // WORLD:
            rows = MICRO * next(accumulation)
            xs = torch.cat([sx[done : done + rows] for sx, _ in shards])
            ys = torch.cat([sy[done : done + rows] for _, sy in shards])
            steps.append([(xs, ys)])
            done += rows
    want, net = plain_series(tiny_net(), steps, lr=LR, source="example")
    assert_same_series(got[0]["rows"], want, rel=1e-5)
    for a, b in zip(got[0]["weights"], net.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
