"""How much the monitor costs a training step of the demo, measured side by side after training.

Two copies of the trained model take the same batches, one with a ``GNSMonitor`` (reading ``b_simple`` every
step, so any device sync is paid) and one without, in alternating blocks; the ratio of their median step times
is the overhead.  Copies keep the recorded run untouched.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from noisescale.demo.task import Task
from noisescale.monitor import GNSMonitor

__all__ = ["measure_overhead"]


def measure_overhead(task: Task, *, batch_size: int, micro_batches: int, source: str, blocks: int = 8) -> float:
    """Median step time with the monitor divided by the median without it (same batches, interleaved)."""
    batches = [task.batch(batch_size) for _ in range(4)]
    plain = copy.deepcopy(task.model)
    watched = copy.deepcopy(task.model)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt_watched = torch.optim.SGD(watched.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {"plain": [], "monitor": []}
    with GNSMonitor(watched, source=source, on_unsupported=task.on_unsupported) as monitor:  # type: ignore[arg-type]

        def one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
            for xm, ym in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
                (task.loss(model(xm), ym) * (len(xm) / batch_size)).backward()
            if model is watched:
                _ = monitor.step(batch_size=batch_size).b_simple
            opt.step()
            opt.zero_grad(set_to_none=True)

        for x, y in batches[:2]:  # warm-up
            one_step(plain, opt_plain, x, y)
            one_step(watched, opt_watched, x, y)
        for block in range(blocks):
            order = [("plain", plain, opt_plain), ("monitor", watched, opt_watched)]
            for name, model, opt in order if block % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                for x, y in batches:
                    one_step(model, opt, x, y)
                times[name].append((time.perf_counter() - start) / len(batches))
    return statistics.median(times["monitor"]) / statistics.median(times["plain"])
