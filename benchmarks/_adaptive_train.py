"""One training run of ``adaptive.py``: a workload, a batch schedule, a seed and a learning rate, to the target.

The batch schedule is always a ``noisescale.BatchSizeController`` (``constant`` for the fixed batches,
``linear_ramp``, ``gns``), so the learning rate follows the batch by the same rule in every run.  The monitor runs
in every run (the run store then holds B_simple for the planner).  The training loss on the whole evaluation set
is computed every ``eval_examples`` examples; the examples at which it reaches the target are interpolated
between the two evaluations around the crossing (linearly in log-loss), and the steps are the fractional step at
which those examples were seen.  The held-out loss at the examples budget is interpolated the same way between
the steps just before and just after the budget.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import noisescale as ns
from _adaptive_tasks import Workload

MICRO = 4
"""Micro-batches per step where the monitor measures from micro-batches (``Spec.micro``)."""


@dataclass
class Spec:
    """A batch schedule: ``schedule`` is ``"fixed"``, ``"linear_ramp"`` or ``"gns"``; ``label`` names it.

    ``micro``: measure from ``MICRO`` micro-batches per step with Adam's preconditioned noise scale beside the
    plain one (``precondition=``), instead of per example; the controller's ``signal`` picks which it follows.
    """

    label: str
    schedule: str
    batch_size: int | None = None
    controller: dict[str, Any] = field(default_factory=dict)
    micro: bool = False


@dataclass
class Result:
    label: str
    schedule: str
    batch_size: int | None
    seed: int
    lr_mult: float
    lr: float
    steps: float | None  # optimizer steps to reach the target training loss (None: not reached)
    examples: float | None
    heldout_at_budget: float | None
    train_at_budget: float | None
    final_train: float
    seconds: float
    batches: list[int]  # the batch size of every step
    run_path: str | None

    @property
    def reached(self) -> bool:
        return self.steps is not None


def controller_for(w: Workload, spec: Spec, optimizer: torch.optim.Optimizer, run: Any) -> ns.BatchSizeController:
    common = {"lr_rule": w.lr_rule, "base_batch": w.batch_ref, "optimizer": optimizer, "run": run}
    if spec.schedule == "fixed":
        assert spec.batch_size is not None
        return ns.BatchSizeController("constant", batch_size=spec.batch_size, **common)
    if spec.schedule == "linear_ramp":
        start, end, over = w.ramp
        return ns.BatchSizeController(
            "linear_ramp", batch_size=start, ramp_to=end, ramp_examples=over, quantize="pow2", **common
        )
    settings = {**w.gns, **common, **spec.controller}
    if settings["lr_rule"] == "workload":  # the rule the fixed batches use (linear for SGD, sqrt for AdamW)
        settings["lr_rule"] = w.lr_rule
    return ns.BatchSizeController("gns", **settings)


def train(
    w: Workload, spec: Spec, *, seed: int, lr_mult: float, runs_dir: Path | None, max_examples: int | None = None
) -> Result:
    """Train until the target training loss is reached and the examples budget is spent (or ``max_examples``)."""
    torch.set_num_threads(1)
    lr = w.lr_ref * lr_mult
    problem = w.make(seed, lr)
    cap = max_examples or w.max_examples
    config = {
        "schedule": spec.schedule,
        "batch_size": spec.batch_size,
        "lr": lr,
        "seed": seed,
        "workload": w.name,
        "target_loss": w.target_loss,
        "label": spec.label,
        "lr_rule": w.lr_rule,
        "lr_batch": w.batch_ref,
        "lr_mult": lr_mult,
        "controller": spec.controller,
    }
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{w.name}-{spec.label}-lr{lr_mult:g}-s{seed}")
    run = ns.Run(name, dir=runs_dir, config=config) if runs_dir else None
    try:
        ctrl = controller_for(w, spec, problem.optimizer, run)
        if spec.micro:
            monitor = ns.GNSMonitor(
                problem.model,
                source="microbatch",
                halflife=w.halflife,
                per_layer=False,
                precondition=problem.optimizer if w.adam else None,
                run=run,
            )
        else:
            monitor = ns.GNSMonitor(
                problem.model,
                source="example",
                halflife=w.halflife,
                per_layer=False,
                on_unsupported=problem.on_unsupported,  # type: ignore[arg-type]
                run=run,
            )
        micro = MICRO if spec.micro else 1
        sampler = ns.AdaptiveBatchSampler(problem.n_train, ctrl.batch_size, seed=seed)
        steps_to: float | None = None
        examples_to: float | None = None
        held = train_at_budget = None
        held_before: tuple[int, float, float] | None = None
        next_eval, examples, step, batches = w.eval_examples, 0, 0, []
        last_eval = (0, problem.train_loss())
        start = time.perf_counter()
        while examples < cap:
            step += 1
            sampler.batch_size = ctrl.batch_size
            if held is None and examples < w.budget <= examples + ctrl.batch_size:
                held_before = (examples, problem.heldout_loss(), problem.train_loss())
            idx = sampler.next_batch()
            x, y = problem.fetch(idx)
            loss = torch.zeros(())
            for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):  # equal chunks: the same mean loss
                part = problem.loss(problem.model(xb), yb) / micro
                part.backward()
                loss = loss + part.detach()
            m = monitor.step(batch_size=len(idx))
            ctrl.step(m)
            problem.optimizer.step()
            problem.optimizer.zero_grad(set_to_none=True)
            examples += len(idx)
            batches.append(len(idx))
            if run is not None:
                run.log(step, {"loss": loss.detach()})
            if steps_to is None and examples >= next_eval:
                next_eval = examples + w.eval_examples
                train_loss = problem.train_loss()
                if run is not None:
                    run.log(step, {"train_loss": train_loss})
                if train_loss <= w.target_loss:
                    examples_to = _crossing(last_eval, (examples, train_loss), w.target_loss)
                    steps_to = _step_at(batches, examples_to)
                last_eval = (examples, train_loss)
            if held is None and examples >= w.budget:
                assert held_before is not None
                e0, h0, t0 = held_before
                f = (w.budget - e0) / (examples - e0)
                held = h0 + f * (problem.heldout_loss() - h0)
                train_at_budget = t0 + f * (problem.train_loss() - t0)
                if run is not None:
                    run.log(step, {"val_loss": held})
            if steps_to is not None and held is not None:
                break
        seconds = time.perf_counter() - start
        monitor.close()
        ctrl.close()
        final = problem.train_loss()
    finally:
        if run is not None:
            run.close()
    return Result(
        label=spec.label,
        schedule=spec.schedule,
        batch_size=spec.batch_size,
        seed=seed,
        lr_mult=lr_mult,
        lr=lr,
        steps=steps_to,
        examples=examples_to,
        heldout_at_budget=held,
        train_at_budget=train_at_budget,
        final_train=final,
        seconds=seconds,
        batches=batches,
        run_path=str(run.path) if run is not None and run.path is not None else None,
    )


def _crossing(a: tuple[int, float], b: tuple[int, float], target: float) -> float:
    """Examples at which the loss reached ``target`` between evaluations ``a`` and ``b`` (linear in log-loss)."""
    (e0, l0), (e1, l1) = a, b
    if l0 <= target or l0 <= l1 or l1 <= 0:
        return float(e1)
    f = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
    return e0 + min(1.0, max(0.0, f)) * (e1 - e0)


def _step_at(batches: list[int], examples: float) -> float:
    """The (fractional) optimizer step at which ``examples`` examples had been seen."""
    seen = 0
    for i, b in enumerate(batches):
        if seen + b >= examples:
            return i + (examples - seen) / b
        seen += b
    return float(len(batches))
