"""Save an adaptive-batch run mid-way, restore it in a fresh process, and continue exactly (bit for bit, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers.adaptive_run import SAVE_AT, STEPS

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.adaptive_run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_save_restore_in_a_fresh_process_continues_identically(tmp_path):
    _run("full", str(tmp_path / "full.pt"), str(tmp_path / "ckpt.pt"))
    _run("resume", str(tmp_path / "resumed.pt"), str(tmp_path / "ckpt.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)

    rec = full["record"]
    assert len(rec) == STEPS
    batches = [r["batch"] for r in rec]
    # the run is worth resuming: the batch changes before and after the checkpoint
    assert len(set(batches[: SAVE_AT - 1])) > 1 and len(set(batches[SAVE_AT - 1 :])) > 1, batches
    # batch sizes, learning rates used, sampled examples, losses and B_simple: identical floats and lists
    assert resumed["record"] == rec[SAVE_AT:]
    after = [e for e in full["events"] if e[2] > SAVE_AT]
    assert resumed["events"] == after and after
    assert resumed["metrics"] == [m for m in full["metrics"] if m[0] > SAVE_AT]
