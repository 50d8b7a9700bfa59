"""Training runs for ``plan_check.py --generate``: the demo's digits MLP at fixed batches, a ramp, a noise follower.

Each run is one store under ``runs/`` with config ``{schedule, batch_size, lr, seed, workload, target_loss}`` and
the training loss logged each step, the format ``adaptive.py`` writes.  Every fixed batch is trained at each
learning rate of a small grid (the model assumes a tuned learning rate; ``plan_check`` keeps the best one).  The
ramp and the noise follower take, at each batch, the learning rate that was best for the nearest fixed batch of
the same seed.  Training stops once the loss, averaged over a centred window of ``window`` examples (the measure
``plan_check`` reads), has reached the target and that window is complete.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import noisescale as ns
from noisescale.demo.digits import make_digits_task
from noisescale.store import Run

WORKLOAD = "digits-mlp"
TARGET_LOSS = 0.01
BATCHES = (16, 32, 64, 128, 256)
LRS = (0.2, 0.3, 0.4, 0.6, 0.8, 1.0)  # plain SGD on this MLP diverges at 1.6 for every batch here
MAX_EXAMPLES = 150_000
MAX_STEPS = 3_000  # a run this far from the target is not the tuned one of its batch: stop paying for it
RAMP = (16, 256, 15_000)  # start, end, examples
FOLLOW_K, FOLLOW_EVERY = 1.0, 10  # batch = k x B_simple rounded to a power of two, re-decided every 10 steps


def train(
    runs_dir: Path,
    *,
    seed: int,
    schedule: str,
    batch_of: Callable[[int, int, Any], int],
    lr_of: Callable[[int], float],
    batch_size: int | None,
    window: float,
    target: float = TARGET_LOSS,
    max_steps: int = MAX_STEPS,
) -> dict[str, Any]:
    """One training run: ``batch_of(step, examples, last_measurement)`` picks each step's batch and ``lr_of(batch)``
    its learning rate.  Returns a short record (steps, examples, seconds, whether the target was reached)."""
    lr0 = lr_of(batch_size if batch_size else batch_of(1, 0, None))
    task = make_digits_task(seed=seed, lr=lr0)
    model, opt = task.model, task.optimizer
    config = {
        "schedule": schedule,
        "batch_size": batch_size,
        "lr": lr0,
        "seed": seed,
        "workload": WORKLOAD,
        "target_loss": target,
        "lr_rule": "fixed" if batch_size else "best fixed-batch lr of the nearest batch",
    }
    name = f"{schedule}-{batch_size or 'var'}-lr{lr0:g}-s{seed}"
    seen: list[float] = []  # examples seen after each step
    losses: list[float] = []
    steps = examples = 0
    stop_at: int | None = None
    m = None
    start = time.perf_counter()
    with Run(name, dir=runs_dir, config=config) as run:
        monitor = ns.GNSMonitor(model, per_layer=False, run=run)
        try:
            while examples < MAX_EXAMPLES and steps < max_steps and stop_at is None:
                b = batch_of(steps + 1, examples, m)
                for group in opt.param_groups:
                    group["lr"] = lr_of(b)
                x, y = task.batch(b)
                loss = task.loss(model(x), y)
                loss.backward()
                m = monitor.step(batch_size=b)
                run.log(steps + 1, {"loss": loss})
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps, examples = steps + 1, examples + b
                value = float(loss.detach())
                if not math.isfinite(value):
                    break
                seen.append(float(examples))
                losses.append(value)
                stop_at = reached(seen, losses, window, target)
        finally:
            monitor.close()
    return {
        "name": name,
        "steps": steps,
        "examples": examples,
        "seconds": time.perf_counter() - start,
        "reached": stop_at is not None,
    }


def reached(seen: list[float], losses: list[float], window: float, target: float) -> int | None:
    """The step (1-based) just completed if the loss averaged over a centred window of ``window`` examples (the
    measure ``plan_check`` reads, ``noisescale.planning.stretches.smooth_loss``) is at or below ``target`` at the
    latest step whose window is already complete; ``None`` otherwise."""
    half = window / 2
    j = len(seen) - 1
    while j >= 0 and seen[j] + half > seen[-1]:
        j -= 1
    if j < 0:
        return None
    num = den = 0.0
    i = j
    while i >= 0 and seen[i] >= seen[j] - half:
        w = seen[i] - (seen[i - 1] if i else 0.0)
        num, den, i = num + w * losses[i], den + w, i - 1
    for i in range(j + 1, len(seen)):
        if seen[i] > seen[j] + half:
            break
        w = seen[i] - seen[i - 1]
        num, den = num + w * losses[i], den + w
    return len(seen) if num / den <= target else None


def _pow2(v: float, lo: int, hi: int) -> int:
    if not math.isfinite(v):  # an unbounded B_simple (|G|^2 within noise of 0): as large as allowed
        return hi
    return int(min(hi, max(lo, 2 ** round(math.log2(max(v, 1.0))))))


def nearest_lr(tuned: dict[int, float]) -> Callable[[int], float]:
    """The learning rate that was best for the fixed batch nearest ``batch`` (in log scale)."""

    def lr_of(batch: int) -> float:
        return tuned[min(tuned, key=lambda b: abs(math.log(batch / b)))]

    return lr_of


def linear_ramp(start: int, end: int, over: int) -> Callable[[int, int, Any], int]:
    def batch(step: int, examples: int, m: Any) -> int:
        return round(start + (end - start) * min(1.0, examples / over))

    return batch


def follow_noise(k: float, lo: int, hi: int) -> Callable[[int, int, Any], int]:
    """``k x B_simple`` (the monitor's smoothed value) as a power of two in ``[lo, hi]``, every ``FOLLOW_EVERY``
    steps: the simple rule that a batch-size controller refines."""
    state = {"batch": lo}

    def batch(step: int, examples: int, m: Any) -> int:
        if m is not None and step % FOLLOW_EVERY == 1 and m.b_simple is not None:
            state["batch"] = _pow2(k * m.b_simple, lo, hi)
        return state["batch"]

    return batch


def generate(
    runs_dir: Path,
    *,
    seeds: list[int],
    batches: tuple[int, ...],
    lrs: tuple[float, ...],
    window: float,
    target: float = TARGET_LOSS,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The fixed sweep (every batch at every learning rate), then a ramp and a noise follower, per seed."""
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, and the machine is shared
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for seed in seeds:
        best: dict[int, tuple[int, float]] = {}
        for b in batches:
            for lr in lrs:
                r = train(
                    runs_dir,
                    seed=seed,
                    schedule="fixed",
                    batch_of=lambda s, e, m, b=b: b,
                    lr_of=lambda _b, lr=lr: lr,
                    batch_size=b,
                    window=window,
                    target=target,
                    # twice the steps of the best rate so far: this one cannot be the tuned one any more
                    max_steps=min(MAX_STEPS, 2 * best[b][0]) if b in best else MAX_STEPS,
                )
                done.append(r)
                log(
                    f"  {r['name']:<28} {r['steps']:>6} steps {r['examples']:>8} examples {r['seconds']:5.1f} s"
                    + ("" if r["reached"] else "  (target not reached)")
                )
                if r["reached"] and (b not in best or r["steps"] < best[b][0]):
                    best[b] = (r["steps"], lr)
        if not best:
            continue
        lr_of = nearest_lr({b: lr for b, (_, lr) in best.items()})
        lo, hi = min(batches), max(batches)
        variable = (("ramp", linear_ramp(*RAMP)), ("follow", follow_noise(FOLLOW_K, lo, hi)))
        for schedule, fn in variable:
            r = train(
                runs_dir,
                seed=seed,
                schedule=schedule,
                batch_of=fn,
                lr_of=lr_of,
                batch_size=None,
                window=window,
                target=target,
            )
            done.append(r)
            log(
                f"  {r['name']:<28} {r['steps']:>6} steps {r['examples']:>8} examples {r['seconds']:5.1f} s"
                + ("" if r["reached"] else "  (target not reached)")
            )
    return done
