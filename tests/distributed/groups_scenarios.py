"""What the spawned ranks run for per-group statistics under DDP: groups split across ranks, accumulation, bad ids.

(No ``from __future__ import annotations``: the scenarios are pickled by name into spawned processes.)
"""

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from dist_scenarios import LOCAL, make_batch, make_model
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns
from noisescale.errors import GroupsError

STEPS = 4
MICRO = 2
GROUPS = {0: [0, 0, 1, 2, 1, 0], 1: [1, 1, 0, 2, 3, 3]}  # groups 0, 1 and 2 on both ranks, 3 on rank 1 only
BAD_STEP = 2  # rank 1 passes one id too few at this step (0-based) in the "bad" scenario


def _run(rank: int, world: int, *, bad: bool) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = DDP(make_model().double())
    monitor = ns.GNSMonitor(model, source="example", score_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for step in range(STEPS):
        state = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
        x, y = make_batch(step, rank)
        for j, (xj, yj) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True)):
            sync = contextlib.nullcontext() if j == MICRO - 1 else model.no_sync()
            with sync:
                (F.cross_entropy(model(xj), yj) / MICRO).backward()
        groups = torch.tensor(GROUPS[rank])
        if bad and step == BAD_STEP and rank == 1:
            groups = groups[:-1]
        ids = torch.arange(LOCAL) + 100 * rank + 10 * step
        error = None
        try:
            m = monitor.step(batch_size=world * LOCAL, groups=groups, example_ids=ids)
        except GroupsError as e:
            m, error = e.measurement, str(e)
        records.append({"state": state, "x": x, "y": y, "m": m.to_dict(), "error": error})
        opt.step()
        opt.zero_grad()
    monitor.close()
    return records


def groups_worker(rank: int, world: int) -> dict[str, list[dict[str, Any]]]:
    """The run with good ids, then the same run where rank 1 passes bad ids once (one pair of processes)."""
    return {"good": _run(rank, world, bad=False), "bad": _run(rank, world, bad=True)}
