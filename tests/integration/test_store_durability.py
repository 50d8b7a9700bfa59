"""A training process killed with SIGKILL leaves a run file that opens, with everything older than the flush
interval intact, and whose steps are whole (a measurement with all its layer rows, or nothing)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from noisescale.store import open_run, summarize

FLUSH = 0.2
SLACK = 0.3  # scheduling on shared CI cores: the writer may start its commit a little after the deadline
LAYERS = 12

CHILD = r"""
import sys, time
from noisescale.store import Run
from noisescale.types import COLUMNS

folder, layers, flush = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

class M:
    def __init__(self, step):
        self.step = step
    def to_dict(self, per_layer=True):
        row = {c: float(self.step) for c in COLUMNS}
        return {"step": self.step, "examples": 8 * self.step, "batch_size": 8, "source": "example",
                "coverage": 1.0, "status": "ok", "skipped_steps": 0, **row,
                "layers": {f"l{i}.weight": row for i in range(layers)}, "modules": {}}

run = Run("killed", dir=folder, flush_interval=flush)
print("PATH", run.path, flush=True)
step = 0
while True:
    step += 1
    run.log_measurement(M(step))
    run.log(step, {"loss": 1.0 / step})
    print("STEP", step, time.time(), flush=True)  # after the enqueue: this step is now "logged"
    time.sleep(0.01)  # a fast training loop (100 steps/s): the writer keeps up, so lag is only scheduling
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_run_keeps_everything_older_than_the_flush_interval(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(LAYERS), str(FLUSH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logged: list[tuple[int, float]] = []
    path = None
    try:
        assert proc.stdout is not None
        start = None
        for line in proc.stdout:
            parts = line.split()
            if parts[0] == "PATH":
                path = parts[1]
            elif parts[0] == "STEP":
                logged.append((int(parts[1]), float(parts[2])))
                start = start or time.monotonic()
                if time.monotonic() - start > 1.5:
                    break
        assert path is not None, proc.stderr.read() if proc.stderr else ""
        with open_run(path) as live:  # a reader in another process while the run is written
            assert live.info.status == "running" and live.num_steps() > 0
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with open_run(path) as r:
        info = r.info
        assert info.status == "running"  # never closed: the file says so, and when it was last written
        assert killed_at - info.updated_at < 2 * FLUSH + SLACK
        rows = r.measurements()
        steps = [row["step"] for row in rows]
        assert steps == list(range(1, len(steps) + 1))
        old_enough = [s for s, t in logged if t < killed_at - FLUSH - SLACK]
        assert old_enough and steps[-1] >= old_enough[-1], (steps[-1], old_enough[-1])
        mat = r.layer_matrix("b_simple")
        assert len(mat.names) == LAYERS
        assert all(v == float(s) for row in mat.values for v, s in zip(row, mat.step, strict=True))  # whole steps
        loss = r.metric("loss")
        assert loss.step[: len(old_enough)] == old_enough
        assert summarize(r)["steps"] == len(steps)
