"""Run stores written by a real (tiny) training: ``GNSMonitor`` + ``Run`` on a small MLP, for the dashboard tests.

``train_run`` writes a finished run; ``LiveTraining`` trains in a background thread so a test can read the store
while it is written.  Both log the loss, the learning rate and a user metric each step, and write an alert and a
controller decision as events in the shapes the alert rules and the controller use.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisescale.monitor import GNSMonitor
from noisescale.store import Run

MARKUP = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>&amp;'


def alert_data(state: str, *, value: float | None = 12.5, layer: str | None = None) -> dict[str, Any]:
    return {
        "rule": "batch_below_noise",
        "state": state,
        "severity": "warning",
        "action": "raise the batch size or lower the learning rate " + MARKUP,
        "value": value,
        "layer": layer,
    }


def controller_data(before: int, after: int) -> dict[str, Any]:
    return {
        "policy": "gns",
        "before": {"batch_size": before, "accumulation": 1, "lr_scale": 1.0},
        "after": {"batch_size": after, "accumulation": 1, "lr_scale": (after / before) ** 0.5},
        "b_simple": 40.0,
        "b_simple_low": 30.0,
        "b_simple_high": 55.0,
    }


class TinyTraining:
    """A seeded MLP on synthetic data, measured by ``GNSMonitor`` and recorded into ``run``.

    ``adam``: trained with Adam in two micro-batches a step, Adam's preconditioned noise scale measured too.
    """

    def __init__(self, run: Run, *, seed: int = 0, batch_size: int = 16, adam: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.x = torch.randn(512, 6, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()
        self.model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.adam = adam
        if adam:
            self.opt: torch.optim.Optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
            self.monitor = GNSMonitor(self.model, "microbatch", run=run, precondition=self.opt)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
            self.monitor = GNSMonitor(self.model, run=run)
        self.run = run
        self.batch_size = batch_size
        self.step = 0
        self.g = g

    def train_step(self) -> None:
        self.step += 1
        idx = torch.randint(0, len(self.x), (self.batch_size,), generator=self.g)
        out = self.model(self.x[idx])
        loss = nn.functional.cross_entropy(out, self.y[idx])
        if self.adam:  # the same mean loss, from two micro-batches
            for half in idx.chunk(2):
                (nn.functional.cross_entropy(self.model(self.x[half]), self.y[half]) / 2).backward()
        else:
            loss.backward()
        self.monitor.step(batch_size=self.batch_size)
        lr = self.opt.param_groups[0]["lr"]
        acc = (out.argmax(1) == self.y[idx]).float().mean()
        self.run.log(self.step, {"loss": loss.detach(), "lr": lr, "accuracy": acc})
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.monitor.close()


def train_run(
    dir: Path, *, name: str = "tiny", steps: int = 40, seed: int = 0, events: bool = True, adam: bool = False
) -> Path:
    """Train ``steps`` steps into a new finished run in ``dir``; returns its file (``adam``: see ``TinyTraining``)."""
    config = {"lr": 0.1, "batch_size": 16, "seed": seed, "note": MARKUP, "nested": {"depth": [1, 2]}}
    with Run(name, dir=dir, config=config, flush_interval=0.05) as run:
        t = TinyTraining(run, seed=seed, adam=adam)
        for _ in range(steps):
            t.train_step()
            if events and t.step == steps // 4:
                run.event("alert", "batch far below B_simple " + MARKUP, step=t.step, data=alert_data("firing"))
            if events and t.step == steps // 2:
                run.event("controller", "B_simple rose above the batch: doubling it", step=t.step,
                          data=controller_data(16, 32))  # fmt: skip
            if events and t.step == 3 * steps // 4:
                run.event("alert", "batch back near B_simple", step=t.step, data=alert_data("resolved"))
        t.close()
    assert run.path is not None
    return run.path


class LiveTraining:
    """Trains a tiny model in a background thread, one step every ``delay`` seconds, writing a run in ``dir``.

    ``fire_alert()`` writes an alert event at the current step; ``stop()`` ends the training and closes the run.
    """

    def __init__(self, dir: Path, *, name: str = "live", delay: float = 0.02, max_steps: int = 100_000) -> None:
        self.run = Run(name, dir=dir, config={"lr": 0.1, "note": MARKUP}, flush_interval=0.05)
        assert self.run.path is not None
        self.path: Path = self.run.path
        self.delay = delay
        self.max_steps = max_steps
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._training = TinyTraining(self.run)
        self._thread = threading.Thread(target=self._loop, name="live-training", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> LiveTraining:
        self._thread.start()
        return self

    @property
    def step(self) -> int:
        return self._training.step

    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and self._training.step < self.max_steps:
                with self._lock:
                    self._training.train_step()
                time.sleep(self.delay)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def wait_for_step(self, step: int, timeout: float = 30.0) -> None:
        """Block until the run file holds ``step`` (training reached it and the writer committed it)."""
        end = time.monotonic() + timeout
        while self._training.step < step:
            if time.monotonic() > end or not self._thread.is_alive():
                raise TimeoutError(f"training reached step {self._training.step}, not {step}")
            time.sleep(0.01)
        self.run.flush(timeout=timeout)

    def fire_alert(self, message: str, *, state: str = "firing") -> int:
        with self._lock:
            step = self._training.step
            # The monitor hands measurements to the run through its sink queue; drain it first so the alert
            # lands after the measurement of its step, as it does when the alert engine is a sink on that queue.
            self._training.monitor.flush()
            self.run.event("alert", message, step=step, data=alert_data(state))
        self.run.flush(timeout=10)
        return step

    def stop(self) -> None:
        """End the training and close the run (idempotent); re-raises an error of the training thread."""
        if self.run.closed:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        self._training.close()
        self.run.close()
        if self.error is not None:
            raise self.error
