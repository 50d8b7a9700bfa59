"""What each spawned rank runs for tests/distributed/test_controller_ddp.py: DDP with the batch-size controller.

Every rank trains its share of each step (from an ``AdaptiveBatchSampler`` that reads the world from
``torch.distributed``), measures with the monitor (the ``rank`` source), and lets the controller decide from the
measurement and the all-reduced loss.  It returns plain data for the parent to compare across ranks.
"""

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns
from noisescale.controllers import Stall

N = 203  # odd: steps cross epoch ends
STEPS = 60


def adaptive_ddp_worker(rank: int, world: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = ((x[:, 0] + 0.5 * torch.randn(N, generator=g)) > 0).long()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sampler = ns.AdaptiveBatchSampler(N, 8, seed=5)
    ctrl = ns.BatchSizeController(
        "gns",
        min_batch=4,
        max_batch=64,
        k=0.5,
        use_band=False,
        hysteresis=0.1,
        dwell=16,
        lr_rule="sqrt",
        optimizer=opt,
        stall=Stall(patience=200, duration=60, action="lower_batch", noise_below=4.0),
        sampler=sampler,
    )
    monitor = ns.GNSMonitor(model)
    lrs: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    records = []
    for step in range(1, STEPS + 1):
        idx = sampler.next_batch()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        m = monitor.step(batch_size=len(idx) * world)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # the stall response reads a loss that is the same on every rank
        d = ctrl.step(m, loss=mean_loss / world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append(
            {
                "step": step,
                "indices": idx,
                "batch_used": len(idx) * world,
                "status": m.status,
                "decided": d.batch_size,
                "changed": d.changed,
                "reason": d.reason,
                "lr": lrs[-1],
            }
        )
    monitor.close()
    return {"records": records, "world": (sampler.num_replicas, sampler.rank), "source": monitor.source}
