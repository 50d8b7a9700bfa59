"""What the spawned ranks run for the cadence tests: DDP under ``every=`` and ``budget=``.

(No ``from __future__ import annotations``: DDP checks a comm hook's ``bucket`` annotation at runtime.)
"""

import time
from typing import Any

import torch
import torch.nn.functional as F
from dist_scenarios import make_batch, make_model
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns
from noisescale.sink import BaseSink

STEPS = 40


def _run(rank: int, source: str, steps: int, delay: dict[bool, float] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``steps`` steps of DDP; ``delay[armed]`` seconds of extra work per step, so the ranks' timings differ."""
    torch.manual_seed(0)
    model = DDP(make_model().double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list[tuple[int, dict[str, Any]]] = []

    class Keep(BaseSink):
        def on_event(self, event: Any) -> None:
            events.append((event.step, dict(event.data or {})))

    monitor = ns.GNSMonitor(model, source=source, sinks=[Keep()], **kwargs)  # type: ignore[arg-type]
    records = []
    for step in range(steps):
        x, y = make_batch(step % 5, rank)
        F.cross_entropy(model(x), y).backward()
        if delay is not None:
            time.sleep(delay[monitor._armed])
        m = monitor.step(batch_size=2 * x.shape[0])
        records.append({"status": m.status, "grad_sq_raw": m.grad_sq_raw, "trace_cov_raw": m.trace_cov_raw})
        opt.step()
        opt.zero_grad()
    monitor.flush()
    monitor.close()
    return {"records": records, "events": events}


def cadence_worker(rank: int, world: int) -> dict[str, Any]:
    # Rank 1's measured steps look five times as costly as rank 0's: left to itself it would choose otherwise.
    delays = {0: {True: 0.004, False: 0.0}, 1: {True: 0.02, False: 0.0}}
    return {
        "budget": _run(rank, "example", STEPS, delays[rank], budget=0.05),
        "budget_rank": _run(rank, "rank", STEPS, delays[rank], budget=0.05),
        "every1": _run(rank, "rank", 10),
        "every3": _run(rank, "rank", 10, every=3),
    }
