#!/usr/bin/env python3
"""Where the ``rank`` source's time goes on a DDP step (``ddp_overhead.make_model``, 2 gloo processes, CPU).

Each rank runs plain DDP and DDP with ``GNSMonitor(source="rank")`` alternately, step by step, from the same
parameters and batch, and times (rank 0, median over steps after a warm-up):

* the forward and backward pass, ``monitor.step()`` and the whole step of each;
* inside the monitored one, by wrapping the functions in place: the hooks that square each local gradient's norm
  (``RankCollector._on_grad_ready``, summed per step), the launch of the statistics' gather when the backward
  pass ends (``_after_backward``), the squared norm of the averaged ``p.grad`` (``grad_sq_norms``), the whole
  cross-rank reduction (``DataParallelSync.reduce``) and the estimator's arithmetic (``host_step``).

Both memory-bound passes (the local gradient in the hooks, the averaged one in ``step()``) read every gradient
once; their time against the plain step is the floor of what the source can cost.  Usage::

    python benchmarks/ddp_parts.py [--steps 120] [--batch 256] [--out benchmarks/results/ddp_parts.json]
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns
import noisescale.distributed as nsd
import noisescale.estimators.engine as nse
from ddp_overhead import DEFAULTS, _free_port, make_model
from noisescale.collectors.rank import RankCollector

HERE = Path(__file__).resolve().parent
WARMUP = 20


def _timed(owner: Any, name: str, into: list[float]) -> None:
    """Replace ``owner.name`` by a wrapper that appends each call's seconds to ``into``."""
    inner: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    parts: dict[str, list[float]] = collections.defaultdict(list)
    _timed(RankCollector, "_on_grad_ready", parts["hooks (sum per step)"])
    _timed(RankCollector, "_after_backward", parts["gather launch at the end of backward"])
    _timed(nsd, "grad_sq_norms", parts["norm of the averaged p.grad"])
    _timed(nsd.DataParallelSync, "reduce", parts["cross-rank reduce (with that norm)"])
    _timed(nse, "host_step", parts["estimator arithmetic"])

    torch.manual_seed(0)
    base = make_model(args.width)
    models = {"plain": DDP(copy.deepcopy(base)), "rank": DDP(copy.deepcopy(base))}
    monitor = ns.GNSMonitor(models["rank"], source="rank")
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    gen = torch.Generator().manual_seed(100 + rank)
    local = args.batch // world
    x, y = torch.randn(local, 256, generator=gen), torch.randint(0, 10, (local,), generator=gen)
    steps: dict[str, list[float]] = collections.defaultdict(list)
    n_hooks = 0
    for i in range(args.steps):
        for name, model in models.items():
            before = len(parts["hooks (sum per step)"])
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            if name == "rank":
                monitor.step(batch_size=args.batch)
            t2 = time.perf_counter()
            opts[name].step()
            t3 = time.perf_counter()
            if name == "rank":
                n_hooks = len(parts["hooks (sum per step)"]) - before
            if i >= WARMUP:
                steps[f"{name}: forward + backward"].append(t1 - t0)
                steps[f"{name}: monitor.step()"].append(t2 - t1)
                steps[f"{name}: whole step"].append(t3 - t0)
    if rank == 0:
        hooks = parts.pop("hooks (sum per step)")
        per_step = [sum(hooks[j : j + n_hooks]) for j in range(0, len(hooks), n_hooks)][WARMUP:]
        table = {k: 1e3 * statistics.median(v) for k, v in steps.items()}
        table["rank: hooks (sum per step)"] = 1e3 * statistics.median(per_step)
        for k, v in parts.items():
            table[f"rank: {k}"] = 1e3 * statistics.median(v[WARMUP:])
        params = sum(p.numel() for p in base.parameters())
        result = {"config": vars(args) | {"world": world, "params": params, "hooks_per_step": n_hooks}, "ms": table}
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=256, help="examples per step, both ranks together")
    ap.add_argument("--width", type=int, default=DEFAULTS["width"])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ddp_parts.json")
    args = ap.parse_args(argv)
    config = argparse.Namespace(steps=args.steps, batch=args.batch, width=args.width)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(2, _free_port(), config, out_dir), nprocs=2, start_method="spawn")
        with open(os.path.join(out_dir, "result.json")) as f:
            result = json.load(f)
    c = result["config"]
    print(
        f"DDP, 2 gloo processes x 1 thread, {c['params'] / 1e6:.2f} M parameters, global batch {c['batch']}, "
        f"{c['steps'] - WARMUP} steps after {WARMUP} of warm-up; rank 0, median ms"
    )
    print("| part | ms |\n|---|---|")
    for k, v in result["ms"].items():
        print(f"| {k} | {v:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
