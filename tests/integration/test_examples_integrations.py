"""The framework examples run end to end (a few steps each), as a reader would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=400, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("sklearn")
    args = ["--epochs", "1", "--batch", "128", "--accumulate", "2", "--every", "3", "--runs", str(tmp_path)]
    out = run("lightning_train.py", *args, cwd=tmp_path)
    steps = [line for line in out.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in steps] == ["3", "6"]
    assert all("batch 256  B_simple" in line and "(microbatch)" in line for line in steps)
    assert "8 steps measured (microbatch source)" in out  # 15 batches of 128 (the last of 5): 8 steps
    assert len(list(tmp_path.glob("lightning-digits-*.sqlite"))) == 1


def test_lightning_example_drives_the_batch(tmp_path):
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("sklearn")
    args = ["--adaptive", "--epochs", "4", "--every", "20", "--runs", str(tmp_path)]
    out = run("lightning_train.py", *args, cwd=tmp_path)
    sizes = [int(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert sizes and sizes[0] == 32 and all(b in (32, 64, 128, 256) for b in sizes)
    assert "controller:" in out and "(example)" in out
    import noisescale as ns

    (path,) = tmp_path.glob("lightning-digits-*.sqlite")
    with ns.open_run(path) as reader:
        events = [e for e in reader.events() if e["kind"] == "controller"]
        assert len(events) >= 1 and events[0]["data"]["before"]["accumulation"] == 1


def test_hf_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    out = run(
        "hf_trainer.py", "--steps", "10", "--batch", "2", "--accumulate", "2", "--runs", str(tmp_path), cwd=tmp_path
    )
    logs = [line for line in out.splitlines() if "'loss'" in line]
    assert len(logs) == 1 and "noisescale/b_simple" in logs[0] and "'noisescale/batch_size': '4'" in logs[0]
    assert "10 steps measured (microbatch source)" in out


def test_accelerate_example(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    out = run("accelerate_train.py", "--epochs", "1", "--save", str(tmp_path / "state"), cwd=tmp_path)
    steps = [line for line in out.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in steps] == ["10", "20"]  # 56 full batches, two a step: 28 steps
    assert all("batch 64" in line and "(microbatch)" in line for line in steps)
    assert (tmp_path / "state" / "custom_checkpoint_0.pkl").exists()  # the monitor's state, saved by accelerate


def test_preference_noise_example(tmp_path):
    pytest.importorskip("trl")
    out = run(
        "preference_noise.py", "--steps", "4", "--flips", "0,0.3", "--plot", str(tmp_path / "p.png"), cwd=tmp_path
    )
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0%", "30%"))]
    assert [r[0] for r in rows] == ["0%", "30%"]
    assert rows[1][3] == "6.25x"  # the expectation at the start, 1 / (1 - 2 * 0.3)^2
    pytest.importorskip("matplotlib")
    assert (tmp_path / "p.png").stat().st_size > 1000
