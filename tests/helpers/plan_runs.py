"""Synthetic run stores for the planner's tests: chosen raw estimates of |G|^2 and tr(Sigma), a chosen loss."""

import math
import random

from noisescale.store import Run
from noisescale.types import COLUMNS


class Meas:
    """What ``Run.log_measurement`` reads (``to_dict``): a whole-model row with chosen raw estimates."""

    def __init__(self, step, examples, batch, t, g, status="ok"):
        self.row = {c: None for c in COLUMNS}
        if status == "ok":
            self.row.update(trace_cov_raw=t, grad_sq_raw=g, trace_cov=t, grad_sq=g, b_simple=t / g if g > 0 else None)
        self.head = {
            "step": step,
            "examples": examples,
            "batch_size": batch,
            "source": "example",
            "coverage": 1.0,
            "status": status,
            "skipped_steps": 0,
        }

    def to_dict(self, per_layer=True):
        return {**self.head, **self.row, "layers": {}, "modules": {}}


def write_run(tmp_path, *, noise, batch=32, steps=400, spread=0.05, seed=0, loss=None, name="synthetic", status=None):
    """A run of ``steps`` steps of ``batch(step)`` examples whose raw estimates scatter by ``spread`` around
    ``|G|^2 = 1`` and ``tr(Sigma) = noise(step)``; the loss is ``loss(step)`` (default ``exp(-step / 150)``)."""
    rng = random.Random(seed)
    batch_of = batch if callable(batch) else (lambda s: batch)
    noise_of = noise if callable(noise) else (lambda s: noise)
    loss_of = loss or (lambda s: math.exp(-s / 150))
    examples = 0
    with Run(name, dir=tmp_path, config={"schedule": "fixed"}) as run:
        for s in range(1, steps + 1):
            b = batch_of(s)
            examples += b
            g = 1.0 + spread * rng.gauss(0, 1)
            t = noise_of(s) * (1.0 + spread * rng.gauss(0, 1))
            st = status(s) if status else "ok"
            run.log_measurement(Meas(s, examples, b, t, g, st))
            if loss is not False:
                run.log(s, {"loss": loss_of(s)})
    return run.path
