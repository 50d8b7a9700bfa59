"""The batch-size controller under DDP on 2 CPU processes (gloo): identical decisions, disjoint covering shards."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch.distributed as dist
from controller_scenarios import STEPS, N, adaptive_ddp_worker
from dist_harness import run_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(150),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD = 2


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(adaptive_ddp_worker, world=WORLD)


def test_ranks_take_identical_decisions_at_identical_steps(runs):
    assert [r["world"] for r in runs] == [(WORLD, 0), (WORLD, 1)]  # the sampler read the process group
    assert runs[0]["source"] == "rank"
    keys = ("step", "status", "decided", "changed", "reason", "lr", "batch_used")
    per_rank = [[tuple(rec[k] for k in keys) for rec in r["records"]] for r in runs]
    assert per_rank[0] == per_rank[1]
    changes = [rec for rec in runs[0]["records"] if rec["changed"]]
    assert len({rec["decided"] for rec in changes}) >= 2, [rec["reason"] for rec in changes]  # it did move
    recs = runs[0]["records"]
    for before, after in itertools.pairwise(recs):  # each decision is what the next step trained on
        assert after["batch_used"] == before["decided"]


def test_shards_are_disjoint_and_cover_every_example_once_per_epoch(runs):
    stream = []
    for step in range(STEPS):
        shares = [r["records"][step]["indices"] for r in runs]
        assert len(shares[0]) == len(shares[1]) == runs[0]["records"][step]["batch_used"] // WORLD
        assert not set(shares[0]) & set(shares[1])
        stream += shares[0] + shares[1]  # the step's global batch, rank by rank
    assert len(stream) >= 2 * N  # more than two epochs, through batch-size changes
    for e in range(len(stream) // N):
        assert sorted(stream[e * N : (e + 1) * N]) == list(range(N)), f"epoch {e}"
