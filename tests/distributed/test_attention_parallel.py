"""``nn.MultiheadAttention`` under DDP and FSDP2 (2 CPU processes, gloo): the example source's value on the global
batch, as one process computes it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from attention_scenarios import LOCAL, STEPS, attention_worker, make_batch, make_model
from dist_harness import run_distributed

import noisescale as ns

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(150),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD = 2


def test_attention_under_ddp_and_fsdp2_equals_one_process_on_the_global_batch() -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    runs = run_distributed(attention_worker, world=WORLD)
    model = make_model()
    monitor = ns.GNSMonitor(model, source="example")
    for step in range(STEPS):
        batches = [make_batch(step, rank) for rank in range(WORLD)]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        want = monitor.step(batch_size=LOCAL * WORLD)
        for wrapper in ("ddp", "fsdp", "fsdp/attention"):
            for rank in range(WORLD):
                got = runs[rank][wrapper][step]
                assert got["coverage"] == 1.0
                for key in ("grad_sq_raw", "trace_cov_raw"):
                    assert got[key] == pytest.approx(getattr(want, key), rel=1e-9), (wrapper, rank, step, key)
    monitor.close()
