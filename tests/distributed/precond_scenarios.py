"""What the spawned ranks run for the preconditioned noise scale under DDP (2 CPU processes, gloo).

Each rank trains the same DDP model with Adam and records, per step, the parameters before it, its batch, Adam's
divisor after ``optimizer.step()`` (the same on every rank) and the measurement, for the rank source and for the
micro-batch source under ``no_sync()``; the parent recomputes everything alone.
"""

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from dist_scenarios import LOCAL, _ddp, _state, make_batch
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns
from noisescale.preconditioner import WARMUP_STEPS

STEPS = WARMUP_STEPS + 3
MICRO = 2


def _divisors(opt: torch.optim.Optimizer, model: DDP) -> dict[str, torch.Tensor]:
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = {}
    for n, p in model.named_parameters():
        state = opt.state[p]
        out[n.removeprefix("module.")] = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps
    return out


def _run(rank: int, world: int, source: str, micro: int) -> list[dict[str, Any]]:
    model = _ddp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = ns.GNSMonitor(model, source=source, precondition=opt)  # type: ignore[arg-type]
    records = []
    for step in range(STEPS):
        state = _state(model)
        x, y = make_batch(step, rank)
        for j, (xj, yj) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            sync = contextlib.nullcontext() if j == micro - 1 else model.no_sync()
            with sync:
                (F.cross_entropy(model(xj), yj) / micro).backward()
        m = monitor.step(batch_size=world * LOCAL)
        opt.step()
        opt.zero_grad()
        records.append({"state": state, "x": x, "y": y, "d": _divisors(opt, model), "m": m.to_dict()})
    monitor.close()
    return records


def _one_rank_uneven(rank: int, world: int) -> str:
    """Rank 1 splits its last step unevenly (it alone cannot precondition it): every rank must get an error, not
    a collective of mismatched sizes."""
    model = _ddp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = ns.GNSMonitor(model, source="microbatch", precondition=opt)
    try:
        for step in range(WARMUP_STEPS + 2):
            x, y = make_batch(step, rank)
            sizes = [4, 2] if rank == 1 and step == WARMUP_STEPS + 1 else [3, 3]
            for j, (xj, yj) in enumerate(zip(x.split(sizes), y.split(sizes), strict=True)):
                with contextlib.nullcontext() if j == len(sizes) - 1 else model.no_sync():
                    F.cross_entropy(model(xj), yj, reduction="sum").backward()
            monitor.step(batch_size=world * LOCAL, micro_batch_sizes=sizes)
            opt.step()
            opt.zero_grad()
    except ns.NoiseScaleError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        monitor.close()
    return "no error"


def precond_worker(rank: int, world: int) -> dict[str, Any]:
    return {
        "rank": _run(rank, world, "rank", 1),
        "microbatch": _run(rank, world, "microbatch", MICRO),
        "uneven": _one_rank_uneven(rank, world),
    }
