"""``examples/hf_causal_lm.py`` runs end to end (a few steps), plain and with activation checkpointing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_causal_lm.py"


@pytest.mark.parametrize("flags", [[], ["--checkpointing"]], ids=["plain", "checkpointing"])
def test_hf_causal_lm_example_runs(flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "4", "--every", "2", "--batch", "4", *flags],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    assert all("B_simple" in line and "noisiest module" in line for line in lines)
