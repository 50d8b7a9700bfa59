"""The demo's training loop: a seeded run with the monitor on, written to the run store as it goes.

It is an ordinary loop (nanoGPT-style): sample a batch, split it into micro-batches if asked, backward each,
``monitor.step(batch_size=...)``, log the loss, ``optimizer.step()``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import torch

from noisescale.demo.overhead import measure_overhead
from noisescale.demo.progress import CheckpointLines, ProgressBar, is_terminal
from noisescale.demo.task import DemoError, Task
from noisescale.monitor import GNSMonitor
from noisescale.store import Run, RunReader, check_run_name, summarize

__all__ = ["Checkpoint", "DemoOptions", "DemoResult", "TaskName", "run_demo"]

TaskName = Literal["digits", "charlm"]
TASKS: tuple[TaskName, ...] = ("digits", "charlm")


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """Settings of ``noisescale demo`` (``None``: the task's default)."""

    task: TaskName = "digits"
    dir: str = "runs"
    name: str | None = None
    steps: int | None = None
    seed: int = 0
    source: Literal["auto", "example", "microbatch"] = "auto"
    batch_size: int | None = None
    micro_batches: int | None = None
    lr: float | None = None
    halflife: float | None = None
    compare_sources: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Checkpoint:
    """Both sources' smoothed B_simple and band at one step (``--compare-sources``)."""

    step: int
    example: tuple[float | None, float | None, float | None]
    microbatch: tuple[float | None, float | None, float | None]

    @property
    def overlap(self) -> bool:
        """Whether the two bands intersect (the sources are consistent within their uncertainty)."""
        (_, lo1, hi1), (_, lo2, hi2) = self.example, self.microbatch
        if lo1 is None or hi1 is None or lo2 is None or hi2 is None:
            return False
        return max(lo1, lo2) <= min(hi1, hi2)


@dataclass
class DemoResult:
    path: Path
    task: Task
    options: DemoOptions
    steps: int
    batch_size: int
    micro_batches: int
    summary: dict[str, Any]
    final: dict[str, float]
    train_seconds: float
    overhead: float
    checkpoints: list[Checkpoint] = field(default_factory=list)
    microbatch_window: tuple[float | None, float | None] | None = None


def make_task(options: DemoOptions) -> tuple[Task, dict[str, Any]]:
    """The task object and its defaults (``steps``, ``batch_size``, ...)."""
    if options.task == "digits":
        from noisescale.demo import digits

        return digits.make_digits_task(seed=options.seed, lr=options.lr), dict(digits.DEFAULTS)
    if options.task == "charlm":
        from noisescale.demo import charlm

        return charlm.make_charlm_task(seed=options.seed, lr=options.lr), dict(charlm.DEFAULTS)
    raise DemoError(f"unknown demo task {options.task!r}; expected one of {list(TASKS)}")


def run_demo(options: DemoOptions, *, stream: TextIO | None = None, out: TextIO | None = None) -> DemoResult:
    """Train the demo task with the monitor on, recording a run; returns where it is and what it showed.

    Progress (``options.progress``) is a bar redrawn on ``stream`` (default stderr) when it is a terminal; when
    ``out`` (default stdout) is not a terminal, or the bar cannot draw, one line per tenth of the run goes to
    ``out`` instead, flushed as it is written.

    Raises:
        DemoError: the task cannot run here (missing scikit-learn, ...), with what to do.
        noisescale.errors.NoiseScaleError: a bad option (run name, sizes).
    """
    check_run_name(options.name or options.task)  # fail before loading data or building the model
    task, defaults = make_task(options)
    steps = int(options.steps if options.steps is not None else defaults["steps"])
    batch_size = int(options.batch_size if options.batch_size is not None else defaults["batch_size"])
    micro = options.micro_batches
    if micro is None:
        micro = 4 if options.source == "microbatch" or options.compare_sources else 1
    if micro > batch_size:
        raise DemoError(f"--micro-batches {micro} is more than --batch-size {batch_size}")
    config = {
        "task": task.name,
        "steps": steps,
        "batch_size": batch_size,
        "micro_batches": micro,
        "seed": options.seed,
        "source": options.source,
        "halflife": options.halflife,
        "compare_sources": options.compare_sources,
        **task.config,
    }
    source = options.source
    if options.compare_sources:
        if source == "microbatch":
            raise DemoError(
                "--compare-sources records the example source and compares the micro-batch one: "
                "leave --source at auto or example"
            )
        source = "example"
    model, optimizer = task.model, task.optimizer
    bar = ProgressBar(steps, stream=stream, enabled=options.progress)
    out = sys.stdout if out is None else out
    lines = CheckpointLines(steps, stream=out, enabled=options.progress and not (bar.enabled and is_terminal(out)))
    lines.header(f"noisescale demo: training {task.name}, {steps} steps of batch {batch_size}; a line every tenth")
    checkpoints: list[Checkpoint] = []
    marks = {max(1, round(steps * i / 5)) for i in range(1, 6)}
    with Run(options.name or task.name, dir=options.dir, config=config) as run:
        monitor = GNSMonitor(
            model,
            source=source,
            halflife=options.halflife,
            on_unsupported=task.on_unsupported,  # type: ignore[arg-type]
            run=run,
        )
        # A second monitor on the same backward passes, for --compare-sources: same data, other source.
        other = (
            GNSMonitor(model, source="microbatch", per_layer=False, halflife=options.halflife)
            if options.compare_sources
            else None
        )
        threads = torch.get_num_threads()
        if task.threads is not None:
            torch.set_num_threads(task.threads)
        start = time.perf_counter()
        try:
            for step in range(1, steps + 1):
                x, y = task.batch(batch_size)
                loss_sum = torch.zeros(())
                for xm, ym in zip(x.tensor_split(micro), y.tensor_split(micro), strict=True):
                    # Each micro-batch's mean loss, weighted so the step's gradient is the mean over the batch.
                    loss = task.loss(model(xm), ym) * (len(xm) / batch_size)
                    loss.backward()
                    loss_sum += loss.detach()
                m = monitor.step(batch_size=batch_size)
                run.log(step, {"loss": loss_sum})
                if other is not None:
                    m2 = other.step(batch_size=batch_size)
                    run.log(
                        step,
                        {
                            "microbatch/b_simple": m2.b_simple,
                            "microbatch/b_simple_low": m2.b_simple_low,
                            "microbatch/b_simple_high": m2.b_simple_high,
                            "microbatch/grad_sq_raw": m2.grad_sq_raw,
                            "microbatch/trace_cov_raw": m2.trace_cov_raw,
                        },
                    )
                    if step in marks:
                        checkpoints.append(
                            Checkpoint(
                                step,
                                (m.b_simple, m.b_simple_low, m.b_simple_high),
                                (m2.b_simple, m2.b_simple_low, m2.b_simple_high),
                            )
                        )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if bar.due(step) or lines.due(step):  # reading the values syncs with the device: only then
                    lo, hi = m.b_simple_low, m.b_simple_high
                    band = (lo, hi) if lo is not None and hi is not None else None
                    loss_now, b_now = float(loss_sum), m.b_simple
                    bar.update(step, loss=loss_now, b_simple=b_now, band=band)
                    lines.update(step, loss=loss_now, b_simple=b_now, band=band)
        finally:
            torch.set_num_threads(threads)
            bar.close()
            monitor.close()
            if other is not None:
                other.close()
        train_seconds = time.perf_counter() - start
        threads = torch.get_num_threads()
        if task.threads is not None:
            torch.set_num_threads(task.threads)
        try:
            overhead = measure_overhead(
                task, batch_size=batch_size, micro_batches=micro, source=monitor.source or "auto"
            )
        finally:
            torch.set_num_threads(threads)
        final = task.evaluate()
        run.log(steps, final)
        run.event("demo_finished", f"{task.name}: {steps} steps in {train_seconds:.1f} s", step=steps, data=final)
        path = run.path
    assert path is not None
    with RunReader(path) as reader:
        summary = summarize(reader)
        mb_window = _microbatch_window(reader, steps) if options.compare_sources else None
    return DemoResult(
        path=path,
        task=task,
        options=options,
        steps=steps,
        batch_size=batch_size,
        micro_batches=micro,
        summary=summary,
        final=final,
        train_seconds=train_seconds,
        overhead=overhead,
        checkpoints=checkpoints,
        microbatch_window=mb_window,
    )


def _microbatch_window(reader: RunReader, steps: int) -> tuple[float | None, float | None]:
    """First- and last-fifth B_simple of the micro-batch source, from its logged raw estimates."""
    from noisescale.store.summary import window_b_simple

    g = reader.metric("microbatch/grad_sq_raw").value
    t = reader.metric("microbatch/trace_cov_raw").value
    rows = [{"status": "ok", "grad_sq_raw": a, "trace_cov_raw": b} for a, b in zip(g, t, strict=True)]
    fifth = max(1, len(rows) // 5)
    return window_b_simple(rows[:fifth]), window_b_simple(rows[-fifth:])
