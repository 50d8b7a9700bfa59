#!/usr/bin/env python3
"""Where the ``microbatch`` source's time goes on the digits MLP (``_workloads.mlp_digits``, 4 micro-batches).

One process, interleaved trials of blocks of accumulated training steps, each variant's block median divided by
the plain accumulated step's in the same trial (median over trials):

* ``empty_hooks``: a hook per parameter that does nothing (the cost of Python hooks alone);
* ``collector_hooks``: ``MicrobatchCollector``'s hooks (a dot product per parameter and backward), reset each step;
* ``collector_collect``: the same plus ``collect()``;
* ``monitor``: ``GNSMonitor(source="microbatch")`` with ``monitor.step()`` and a read of ``m.b_simple``.

It also times ``monitor.step()`` in place (right after the backward passes) for the ``example`` source on the
same MLP with one batch.  Usage::

    python benchmarks/microbatch_parts.py [--trials 30] [--out benchmarks/results/microbatch_parts.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import noisescale as ns
from _workloads import N_MICRO, mlp_digits
from noisescale.collectors.microbatch import MicrobatchCollector

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain_accum", "empty_hooks", "collector_hooks", "collector_collect", "monitor")


def _variant(name: str, model: torch.nn.Module, batch_size: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(after_backward, close)`` for one variant installed on ``model``."""
    handles: list[Any] = []
    if name == "empty_hooks":
        handles = [p.register_hook(functools.partial(lambda i, g: None, i)) for i, p in enumerate(model.parameters())]
        return (lambda: None), lambda: [h.remove() for h in handles]
    if name in ("collector_hooks", "collector_collect"):
        collector = MicrobatchCollector(model)

        def after() -> None:
            if name == "collector_collect":
                collector.collect(batch_size)
            collector.reset()

        return after, collector.close
    if name == "monitor":
        monitor = ns.GNSMonitor(model, source="microbatch")
        return (lambda: monitor.step(batch_size).b_simple and None), monitor.close
    return (lambda: None), (lambda: None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--steps", type=int, default=30, help="steps per variant and trial")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "microbatch_parts.json")
    args = ap.parse_args(argv)
    wl = mlp_digits()
    state = wl.initial_state()
    model = wl.make_model()
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = wl.batches[0]
    b = x.shape[0]

    def step(after: Callable[[], None]) -> None:
        opt.zero_grad(set_to_none=True)
        for xm, ym in zip(x.chunk(N_MICRO), y.chunk(N_MICRO), strict=True):
            (wl.loss(model(xm), ym) / N_MICRO).backward()
        after()
        opt.step()

    blocks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.trials):
        for name in VARIANTS:
            after, close = _variant(name, model, b)
            for _ in range(3):
                step(after)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(after)
            blocks[name].append((time.perf_counter() - t0) / args.steps)
            close()
    ratios = {
        v: statistics.median(a / p for a, p in zip(blocks[v], blocks["plain_accum"], strict=True)) for v in VARIANTS
    }

    # monitor.step() in place, example source, one batch
    monitor = ns.GNSMonitor(model, source="example")
    in_place = []
    for i in range(400):
        opt.zero_grad(set_to_none=True)
        wl.loss(model(x), y).backward()
        t0 = time.perf_counter()
        _ = monitor.step(b).b_simple  # read, as a training loop that logs it would
        if i >= 100:
            in_place.append(time.perf_counter() - t0)
        opt.step()
    monitor.close()
    step_us = 1e6 * statistics.median(in_place)

    print(f"digits MLP, batch {b}, {N_MICRO} micro-batches, {args.trials} interleaved trials of {args.steps} steps")
    print("| variant | median ms per step | x plain_accum |")
    print("|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {1e3 * statistics.median(blocks[v]):.3f} | {ratios[v]:.3f} |")
    print(f"\nmonitor.step() in place, example source, batch {b}: median {step_us:.0f} us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ratios": ratios, "blocks_s": blocks, "example_step_us": step_us}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
