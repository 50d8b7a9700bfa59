"""A short adaptive-batch training run, saved and resumed across processes (tests/unit/test_controller_resume.py).

    python -m tests.helpers.adaptive_run full OUT CKPT       # steps 1..STEPS, checkpoint after SAVE_AT, record
    python -m tests.helpers.adaptive_run resume OUT CKPT     # load CKPT, steps SAVE_AT+1..STEPS, record to OUT

Everything that carries state is saved: model, optimizer (SGD with momentum), the monitor, the controller (gns,
linear learning rate, momentum horizon, a stall response), the sampler, the example clock and its LambdaLR.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

import noisescale as ns
from noisescale.controllers import Stall

STEPS = 70
SAVE_AT = 35
N = 600


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def event(self, kind: str, message: str = "", *, step: int | None = None, data: Any = None) -> None:
        self.events.append((kind, message, step, data))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))


def build() -> dict[str, Any]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 20, generator=g)
    teacher = torch.randn(20, 4, generator=g)
    y = (x @ teacher + 0.8 * torch.randn(N, 4, generator=g)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    clock = ns.ExampleClock(warmup=200, total=20_000, decay="cosine", start=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, clock)
    sampler = ns.AdaptiveBatchSampler(N, 8, seed=3)
    log = Events()
    ctrl = ns.BatchSizeController(
        "gns",
        min_batch=8,
        max_batch=128,
        quantize="pow2",
        dwell=48,
        hysteresis=0.1,
        k=0.1,
        use_band=False,
        lr_rule="linear",
        optimizer=opt,
        keep_horizons=("momentum",),
        stall=Stall(patience=400, duration=100, action="raise_lr", loss_halflife=50.0),
        sampler=sampler,
        clock=clock,
        run=log,
    )
    monitor = ns.GNSMonitor(model, source="example", halflife=64.0)
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))  # after the controller's
    return {
        "x": x,
        "y": y,
        "model": model,
        "opt": opt,
        "clock": clock,
        "sched": sched,
        "sampler": sampler,
        "ctrl": ctrl,
        "monitor": monitor,
        "log": log,
        "used": used,
    }


def train(parts: dict[str, Any], first: int, last: int) -> list[dict[str, Any]]:
    record = []
    for step in range(first, last + 1):
        idx = parts["sampler"].next_batch()
        loss = F.cross_entropy(parts["model"](parts["x"][idx]), parts["y"][idx])
        loss.backward()
        m = parts["monitor"].step(batch_size=len(idx))
        d = parts["ctrl"].step(m, loss=loss.detach())
        parts["opt"].step()
        parts["opt"].zero_grad(set_to_none=True)
        parts["sched"].step()
        record.append(
            {
                "step": step,
                "indices": idx,
                "loss": loss.item(),
                "b_simple": m.b_simple,
                "batch": d.batch_size,
                "lr_used": parts["used"][-1],
                "reason": d.reason,
            }
        )
    return record


def state(parts: dict[str, Any]) -> dict[str, Any]:
    return {name: parts[name].state_dict() for name in ("model", "opt", "clock", "sched", "sampler", "ctrl", "monitor")}


def main(argv: list[str]) -> None:
    mode, out = argv[0], argv[1]
    torch.set_num_threads(1)
    parts = build()
    if mode == "resume":
        saved = torch.load(argv[2], weights_only=False)
        for name, sd in saved.items():
            parts[name].load_state_dict(sd)
        record = train(parts, SAVE_AT + 1, STEPS)
    else:  # a checkpoint in the middle of a run that goes on, as a training loop takes one
        record = train(parts, 1, SAVE_AT)
        torch.save(state(parts), argv[2])
        record += train(parts, SAVE_AT + 1, STEPS)
    log = parts["log"]
    torch.save({"record": record, "events": log.events, "metrics": log.metrics}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
