"""Spawned ranks that clip or unscale ``p.grad`` between backward and ``monitor.step()`` (DDP, FSDP2, gloo)."""

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from dist_scenarios import LOCAL, make_batch, make_model
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

STEPS = 3


def _run(model: torch.nn.Module, rank: int, world: int, source: str, micro: int) -> list[dict[str, Any]]:
    """Two monitors: one steps right after backward, one after clipping; each step's pair of measurements."""
    before = ns.GNSMonitor(model, source=source)  # type: ignore[arg-type]
    after = ns.GNSMonitor(model, source=source)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(STEPS):
        x, y = make_batch(step, rank)
        for j, (xj, yj) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            last = j == micro - 1
            sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
            with sync:
                (F.cross_entropy(model(xj), yj) / micro).backward()
        m_before = before.step(batch_size=world * LOCAL)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        m_after = after.step(batch_size=world * LOCAL)
        out.append({"before": m_before.to_dict(per_layer=False), "after": m_after.to_dict(per_layer=False)})
        opt.step()
        opt.zero_grad()
    before.close()
    after.close()
    return out


def clip_worker(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for source, micro in (("rank", 1), ("rank", 2), ("example", 1), ("microbatch", 2)):
        torch.manual_seed(0)
        model = DDP(make_model().double())
        results[f"ddp-{source}-{micro}"] = _run(model, rank, world, source, micro)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - older torch
        return results
    torch.manual_seed(0)
    model = make_model().double()
    for layer in model:
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            fully_shard(layer)
    fully_shard(model)
    results["fsdp-example-1"] = _run(model, rank, world, "example", 1)
    return results
