#!/usr/bin/env python3
"""Overhead of the ``rank`` source on a DDP training step: 2 processes, gloo, CPU.

Modes, built on every rank from the same initial parameters and fed the same batches:

* ``plain``: DDP without any hook: zero_grad, forward, backward (with DDP's all-reduce), SGD step;
* ``ns_rank``: the same with ``GNSMonitor(ddp_model, source="rank")``: a hook per parameter that squares the
  norm of the local gradient before DDP averages it, and ``monitor.step()`` (one all-gather of the statistics,
  the estimate, the averages) on every step; no number is read back, as in a loop that logs now and then.

With ``--accum 2`` every step runs two micro-batches per rank, the first under ``no_sync()``.  With ``--every N``
or ``--budget F`` the monitor measures one step in ``N`` (``GNSMonitor(every=N)``) or within ``F`` of the training
time (``budget=F``; rank 0 decides, every rank follows); each block is then ``--steps`` rounded up to whole periods
of ``N`` (20 steps under a budget) and summarised by its mean instead of its median, for both modes, so the measured
steps are counted; the budget's clock runs only inside ``ns_rank``'s own steps.

Modes run interleaved: each trial runs a block of steps of every mode in a fresh random order (the same order on
every rank, since each step is a collective), and the *paired ratio* is the median over trials of
``median(ns_rank block) / median(plain block)`` from the same trial, which holds up on a shared, drifting CPU.
Times are rank 0's; the all-reduce inside each step keeps the ranks in step.  Beside wall time, the process CPU
time of each step (all of rank 0's threads, gloo's included) is reported: on a shared, oversubscribed machine it
shows the work added, without the waits for a descheduled peer.  Usage::

    python benchmarks/ddp_overhead.py                    # batches 128, 256, 512: about three minutes on 2 cores
    python benchmarks/ddp_overhead.py --batch 256 --accum 2
    python benchmarks/ddp_overhead.py --quick            # smoke test

What the rank source adds per step does not grow with the batch: one pass over the local gradients in the hook,
one over ``p.grad`` in ``monitor.step()``, a gather of ``P + 3`` numbers, and the estimator's arithmetic on a few
dozen numbers.  The plain step grows with the batch, so the ratio falls as the per-rank batch grows; the table
has one row per batch size.

Writes ``--out`` (JSON, default ``benchmarks/results/ddp_overhead.json``) and prints a Markdown table.  The
target (wall ratio <= 1.03) is reported, not enforced.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "ddp_overhead.json"
MODES = ("plain", "ns_rank")
TARGET = 1.03
N_BATCHES = 8


def make_model(width: int) -> nn.Module:
    """An MLP of ~2 M parameters over 256 features: about 20-40 ms a step on one CPU thread."""
    return nn.Sequential(
        nn.Linear(256, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, 10)
    )


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    torch.manual_seed(0)
    base = make_model(args.width)
    local = args.batch // world
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [
        (torch.randn(local, 256, generator=gen), torch.randint(0, 10, (local,), generator=gen))
        for _ in range(N_BATCHES)
    ]

    runs: dict[str, dict[str, Any]] = {}
    for name in MODES:
        model = DDP(copy.deepcopy(base))
        monitor = ns.GNSMonitor(model, source="rank", **_cadence(args)) if name == "ns_rank" else None
        runs[name] = {"model": model, "monitor": monitor, "opt": torch.optim.SGD(model.parameters(), lr=1e-3), "i": 0}
        runs[name]["measured"] = 0
    # A budget times the interval between two monitor.step() calls as a training step; between two blocks that
    # would hold the plain mode's block too, so its clock runs only inside this mode's own steps.
    own = {"spent": 0.0, "began": 0.0}
    if args.budget is not None:
        runs["ns_rank"]["monitor"]._cadence._clock = lambda: own["spent"] + time.perf_counter() - own["began"]

    def step(name: str) -> tuple[float, float]:
        r = runs[name]
        model, monitor, opt = r["model"], r["monitor"], r["opt"]
        x, y = batches[r["i"] % N_BATCHES]
        r["i"] += 1
        c0, t0 = time.process_time(), time.perf_counter()
        own["began"] = t0
        opt.zero_grad(set_to_none=True)
        for k, (xm, ym) in enumerate(zip(x.chunk(args.accum), y.chunk(args.accum), strict=True)):
            with model.no_sync() if k < args.accum - 1 else _null():
                (F.cross_entropy(model(xm), ym) / args.accum).backward()
        if monitor is not None:
            r["measured"] += monitor.step(batch_size=args.batch).measured_step == r["i"]  # reads no number
        opt.step()
        t1 = time.perf_counter()
        if monitor is not None:
            own["spent"] += t1 - t0
        return t1 - t0, time.process_time() - c0

    for name in MODES:  # warm-up (DDP rebuilds its buckets after the first step)
        for _ in range(args.warmup):
            step(name)
    period = _period(args)
    steps = period * -(-args.steps // period)  # whole periods of the cadence
    summary = statistics.median if period == 1 else statistics.fmean
    rng = random.Random(args.seed)  # the same stream on every rank: the same mode order
    block_medians: dict[str, list[float]] = {n: [] for n in MODES}
    block_cpu: dict[str, list[float]] = {n: [] for n in MODES}
    all_steps: dict[str, list[float]] = {n: [] for n in MODES}
    for _ in range(args.trials):
        order = list(MODES)
        rng.shuffle(order)
        for name in order:
            ts = [step(name) for _ in range(steps)]
            block_medians[name].append(summary(t for t, _ in ts))
            block_cpu[name].append(summary(c for _, c in ts))
            all_steps[name].extend(t for t, _ in ts)

    check = runs["ns_rank"]["monitor"].step  # one last measured step, read back, to show it measured something
    x, y = batches[0]
    F.cross_entropy(runs["ns_rank"]["model"](x), y).backward()
    m = check(batch_size=args.batch)
    if rank == 0:
        ratios = [a / b for a, b in zip(block_medians["ns_rank"], block_medians["plain"], strict=True)]
        cpu_ratios = [a / b for a, b in zip(block_cpu["ns_rank"], block_cpu["plain"], strict=True)]
        result = {
            "block_medians_s": block_medians,
            "block_cpu_medians_s": block_cpu,
            "step_quartiles_ms": {n: [1e3 * q for q in _quartiles(all_steps[n])] for n in MODES},
            "cpu_step_median_ms": {n: 1e3 * statistics.median(block_cpu[n]) for n in MODES},
            "paired_ratio": dict(zip(("q1", "median", "q3"), _quartiles(ratios), strict=True)),
            "paired_cpu_ratio": dict(zip(("q1", "median", "q3"), _quartiles(cpu_ratios), strict=True)),
            "b_simple_raw_last": m.b_simple_raw,
            "b_simple_last": m.b_simple,
            "measured_share": runs["ns_rank"]["measured"] / max(runs["ns_rank"]["i"], 1),
            "params": sum(p.numel() for p in base.parameters()),
        }
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    for r in runs.values():
        if r["monitor"] is not None:
            r["monitor"].close()
    dist.destroy_process_group()


def _cadence(args: argparse.Namespace) -> dict[str, Any]:
    """The monitor's cadence options from ``--every`` / ``--budget`` (none: every step)."""
    if getattr(args, "budget", None) is not None:
        return {"budget": args.budget}
    every = getattr(args, "every", 1)
    return {"every": every} if every != 1 else {}


def _period(args: argparse.Namespace) -> int:
    """Steps of one cadence period: a block holds whole periods, so each holds its share of measured steps."""
    if getattr(args, "budget", None) is not None:
        return 20
    return int(getattr(args, "every", 1))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DEFAULTS = {
    "world": 2,
    "threads": 1,
    "accum": 1,
    "width": 1024,
    "trials": 25,
    "steps": 6,
    "warmup": 5,
    "seed": 0,
    "every": 1,
    "budget": None,
}
QUICK = {"trials": 3, "steps": 3, "warmup": 2, "width": 256}


def measure(batch: int, *, quick: bool = False, **settings: Any) -> dict[str, Any]:
    """The paired ratio of ``ns_rank`` to plain DDP at one global ``batch``, with ``DEFAULTS`` unless overridden.

    ``benchmarks/overhead.py`` calls this for its DDP row.
    """
    config = {**DEFAULTS, **(QUICK if quick else {}), **settings, "batch": batch}
    result = _run(argparse.Namespace(**config))
    result["config"] = config
    result["meets_target"] = result["paired_ratio"]["median"] <= TARGET
    return result


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a fresh pair of processes; rank 0's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(args.world, _free_port(), args, out_dir), nprocs=args.world, start_method="spawn"
        )
        with open(os.path.join(out_dir, "result.json")) as f:
            return dict(json.load(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=DEFAULTS["world"], help="processes (gloo, CPU)")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads per process")
    p.add_argument(
        "--batch", type=int, nargs="+", default=[128, 256, 512], help="examples per step, all ranks together"
    )
    p.add_argument(
        "--accum",
        type=int,
        default=DEFAULTS["accum"],
        help="micro-batches per rank and step (all but the last under no_sync)",
    )
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="hidden width of the MLP")
    p.add_argument("--trials", type=int, default=DEFAULTS["trials"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="steps per mode and trial")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    cadence = p.add_mutually_exclusive_group()
    cadence.add_argument("--every", type=int, default=DEFAULTS["every"], help="ns_rank measures one step in N")
    cadence.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="ns_rank under budget=F instead")
    p.add_argument("--quick", action="store_true", help="smoke test: few trials, a small model, one batch size")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.batch = args.batch[:1]

    t0 = time.perf_counter()
    results = []
    for batch in args.batch:
        result = _run(argparse.Namespace(**{**vars(args), "batch": batch}))
        result["batch"] = batch
        result["meets_target"] = result["paired_ratio"]["median"] <= TARGET
        results.append(result)
    report = {
        "benchmark": "ddp_overhead",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_ratio": TARGET,
        "wall_s": time.perf_counter() - t0,
        "env": {
            "torch": torch.__version__,
            "noisescale": ns.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(
        f"\nDDP step, {args.world} processes x {args.threads} thread(s), gloo, CPU; MLP of "
        f"{results[0]['params'] / 1e6:.2f} M parameters, {args.accum} micro-batch(es) per rank; {args.trials} "
        f"interleaved trials of {_period(args) * -(-args.steps // _period(args))} steps per mode; "
        "CPU = process time of rank 0, all threads\n"
    )
    print(
        "| batch (per rank) | plain wall ms | ns_rank wall ms | paired wall ratio: median [q1, q3] | target "
        "| plain CPU ms | ns_rank CPU ms | paired CPU ratio: median [q1, q3] |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        q, cpu, ratio, cr = r["step_quartiles_ms"], r["cpu_step_median_ms"], r["paired_ratio"], r["paired_cpu_ratio"]
        verdict = "ok" if r["meets_target"] else "missed"
        print(
            f"| {r['batch']} ({r['batch'] // args.world}) | {q['plain'][1]:.1f} | {q['ns_rank'][1]:.1f} | "
            f"{ratio['median']:.3f} [{ratio['q1']:.3f}, {ratio['q3']:.3f}] | <= {TARGET} {verdict} | "
            f"{cpu['plain']:.1f} | {cpu['ns_rank']:.1f} | {cr['median']:.3f} [{cr['q1']:.3f}, {cr['q3']:.3f}] |"
        )
    print(f"\nlast measured step's b_simple_raw: {[r['b_simple_raw_last'] for r in results]}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
