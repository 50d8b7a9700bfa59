"""``noisescale demo --adaptive``: the digits task with a fixed batch and with the batch-size controller, side by side.

Both runs start from the same weights and see the same number of examples (the controller's may stop up to one
batch short, as it takes whole batches).  The fixed run keeps a small batch
(efficient in examples, but many steps); the controller starts there and grows the batch as B_simple grows, with
the learning rate scaled linearly with the batch (plain SGD).  The closing table shows the steps each needed,
the examples, and the losses at the end; each run is recorded for ``noisescale show`` and ``report``.
"""

from __future__ import annotations

import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from noisescale.controllers import BatchSizeController, ExampleClock
from noisescale.demo.explain import look_further
from noisescale.demo.task import DemoError
from noisescale.monitor import GNSMonitor
from noisescale.store import Run, check_run_name

__all__ = ["AdaptiveOptions", "AdaptiveResult", "Arm", "adaptive_table", "run_adaptive_demo"]

LR_BATCH = 128  # the digits task's learning rate is tuned for batch 128; other batches scale it linearly


@dataclass(frozen=True, kw_only=True)
class AdaptiveOptions:
    """Settings of ``noisescale demo --adaptive`` (``None``: the default)."""

    dir: str = "runs"
    name: str | None = None
    seed: int = 0
    examples: int = 51_200
    batch_size: int = 32
    max_batch: int = 512
    lr: float | None = None
    halflife: float | None = None
    progress: bool = True


@dataclass
class Arm:
    """One of the two runs."""

    label: str
    path: Path
    steps: int
    examples: int
    train_loss: float  # on the whole training set, at the end
    test_loss: float
    test_accuracy: float
    seconds: float
    smallest_batch: int
    largest_batch: int
    changes: int = 0
    batch_by_examples: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class AdaptiveResult:
    options: AdaptiveOptions
    title: str
    fixed: Arm
    adaptive: Arm


def run_adaptive_demo(options: AdaptiveOptions, *, stream: TextIO | None = None) -> AdaptiveResult:
    """Train the digits task twice (fixed batch, then the controller) on the same examples budget.

    Raises:
        DemoError: scikit-learn is missing, or the sizes do not fit the 1,500 training images.
        noisescale.errors.NoiseScaleError: a bad option (run name, batch bounds).
    """
    from noisescale.demo import digits

    name = options.name or "digits"
    check_run_name(f"{name}-adaptive")
    if not options.batch_size <= options.max_batch <= digits.N_TRAIN:
        raise DemoError(
            f"--batch-size {options.batch_size} and the largest batch {options.max_batch} must satisfy "
            f"batch size <= largest batch <= {digits.N_TRAIN} (the training images)"
        )
    out = stream if stream is not None else sys.stderr
    arms = []
    title = ""
    for label in ("fixed", "adaptive"):
        if options.progress:
            out.write(f"training the {label} run ...\n")
            out.flush()
        arm, title = _train(options, label, name)
        arms.append(arm)
    return AdaptiveResult(options=options, title=title, fixed=arms[0], adaptive=arms[1])


def _train(options: AdaptiveOptions, label: str, name: str) -> tuple[Arm, str]:
    from noisescale.demo import digits

    lr = options.lr if options.lr is not None else float(digits.DEFAULTS["lr"])
    task = digits.make_digits_task(seed=options.seed, lr=lr)
    x_train, y_train = _train_set(options.seed)
    config: dict[str, Any] = {
        "task": "digits",
        "schedule": "fixed" if label == "fixed" else "gns",
        "batch_size": options.batch_size if label == "fixed" else None,
        "lr": lr,
        "lr_rule": "linear",
        "lr_batch": LR_BATCH,
        "seed": options.seed,
        "examples": options.examples,
        **task.config,
    }
    threads = torch.get_num_threads()
    if task.threads is not None:
        torch.set_num_threads(task.threads)
    try:
        with Run(f"{name}-{label}", dir=options.dir, config=config) as run:
            monitor = GNSMonitor(task.model, source="example", halflife=options.halflife or 2_000.0, run=run)
            common: dict[str, Any] = {
                "base_batch": LR_BATCH,
                "lr_rule": "linear",
                "optimizer": task.optimizer,
                "run": run,
            }
            if label == "fixed":
                ctrl = BatchSizeController("constant", batch_size=options.batch_size, **common)
            else:
                ctrl = BatchSizeController(
                    "gns",
                    batch_size=options.batch_size,
                    min_batch=options.batch_size,
                    max_batch=options.max_batch,
                    quantize="pow2" if options.batch_size & (options.batch_size - 1) == 0 else "multiple",
                    dwell=2_000,
                    clock=ExampleClock(),
                    **common,
                )
            start = time.perf_counter()
            examples, step = 0, 0
            seen: list[tuple[int, int]] = []
            try:
                while examples + ctrl.batch_size <= options.examples:  # whole batches, none past the budget
                    step += 1
                    b = ctrl.batch_size
                    x, y = task.batch(b)
                    loss = task.loss(task.model(x), y)
                    loss.backward()
                    m = monitor.step(batch_size=b)
                    run.log(step, {"loss": loss.detach()})
                    ctrl.step(m)
                    task.optimizer.step()
                    task.optimizer.zero_grad(set_to_none=True)
                    if not seen or seen[-1][1] != b:
                        seen.append((examples, b))
                    examples += b
            finally:
                monitor.close()
                ctrl.close()
            seconds = time.perf_counter() - start
            with torch.no_grad():
                train_loss = F.cross_entropy(task.model(x_train), y_train).item()
            final = task.evaluate()
            run.log(step, {"train_loss": train_loss, **final})
            path = run.path
    finally:
        torch.set_num_threads(threads)
    assert path is not None
    arm = Arm(
        label=label,
        path=path,
        steps=step,
        examples=examples,
        train_loss=train_loss,
        test_loss=final["test_loss"],
        test_accuracy=final["test_accuracy"],
        seconds=seconds,
        smallest_batch=min(b for _, b in seen),
        largest_batch=max(b for _, b in seen),
        changes=ctrl.state.changes,
        batch_by_examples=seen,
    )
    return arm, task.title


def _train_set(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's training images (the same split ``make_digits_task`` draws for ``seed``)."""
    from noisescale.demo import digits

    x, y = digits.load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[: digits.N_TRAIN]], y[perm[: digits.N_TRAIN]]


def adaptive_table(result: AdaptiveResult) -> str:
    """The closing text: one row per run, then what it shows and where to look."""
    f, a = result.fixed, result.adaptive
    rows = [
        ("", "fixed batch", "controller"),
        ("batch size", f"{f.largest_batch}", f"{a.smallest_batch} to {a.largest_batch} ({a.changes} changes)"),
        ("optimizer steps", f"{f.steps:,}", f"{a.steps:,}"),
        ("examples", f"{f.examples:,}", f"{a.examples:,}"),
        ("final training loss", f"{f.train_loss:.4f}", f"{a.train_loss:.4f}"),
        ("held-out loss", f"{f.test_loss:.4f}", f"{a.test_loss:.4f}"),
        ("held-out accuracy", f"{100 * f.test_accuracy:.1f}%", f"{100 * a.test_accuracy:.1f}%"),
        ("training time", f"{f.seconds:.1f} s", f"{a.seconds:.1f} s"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"noisescale demo --adaptive: {result.title}", ""]
    lines += [f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}" for r in rows]
    saved = 1 - a.steps / f.steps if f.steps else 0.0
    lines += [
        "",
        *textwrap.wrap(
            f"About the same examples, {saved:.0%} fewer optimizer steps: the controller followed B_simple "
            "(the batch at which a gradient's noise equals its signal), keeping the batch small while it was "
            "small and growing it as it grew, with the learning rate scaled along.",
            100,
        ),
    ]
    fixed, adaptive = shlex.quote(str(f.path)), shlex.quote(str(a.path))
    lines += [
        "",
        *look_further(
            "Look further (batch size and learning rate over examples seen are in both runs)",
            [f"show {fixed}", f"show {adaptive}", f"report {adaptive} -o report.html"],
        ),
    ]
    return "\n".join(lines)
