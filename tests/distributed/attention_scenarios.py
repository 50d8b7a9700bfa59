"""``nn.MultiheadAttention`` measured per example under DDP and FSDP2 (what the spawned ranks run).

(No ``from __future__ import annotations``, as in ``dist_scenarios``.)
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

E, HEADS, T, CLASSES = 8, 2, 5, 3
LOCAL = 4  # examples per rank and step
STEPS = 2


class Encoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (its attention is an ``nn.MultiheadAttention``) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Encoder().double()


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(LOCAL, T, E, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (LOCAL,), generator=g)


def run_steps(model: nn.Module, rank: int, world: int) -> list[dict[str, Any]]:
    """``STEPS`` steps at fixed parameters (no optimizer), measured with the example source."""
    monitor = ns.GNSMonitor(model, source="example")
    out = []
    for step in range(STEPS):
        x, y = make_batch(step, rank)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        m = monitor.step(batch_size=LOCAL * world)
        out.append({"grad_sq_raw": m.grad_sq_raw, "trace_cov_raw": m.trace_cov_raw, "coverage": m.coverage})
    monitor.close()
    return out


def attention_worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    results = {"ddp": run_steps(DDP(make_model()), rank, world)}
    model = make_model()
    fully_shard(model.layer)
    fully_shard(model)
    results["fsdp"] = run_steps(model, rank, world)
    model = make_model()  # the attention sharded on its own: unsharded only during its forward
    fully_shard(model.layer.self_attn)
    fully_shard(model.layer)
    fully_shard(model)
    results["fsdp/attention"] = run_steps(model, rank, world)
    return results
