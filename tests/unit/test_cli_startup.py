"""The commands that only read runs start without torch: ``--help``, ``--version``, ``runs``, ``show``, ``report``.

Timing lives in ``benchmarks/cli_startup.py``; this test checks the cause of a slow start instead: which heavy
modules a command imports (torch alone takes seconds to import).
"""

import json
import subprocess
import sys

import pytest
import torch

import noisescale as ns

HEAVY = ("torch", "numpy", "matplotlib", "sklearn", "transformers")

# Runs the command in this fresh interpreter, then lists the heavy modules it imported.
PROBE = r"""
import contextlib, io, json, sys
from noisescale.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
    code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"code": code, "heavy": heavy, "err": err.getvalue()}))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with ns.Run("tiny", dir=root / "runs") as run:
        monitor = ns.GNSMonitor(model, run=run)
        for _ in range(4):
            x = torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            loss.backward()
            m = monitor.step(batch_size=8)
            run.log(m.step, {"loss": loss.item()})
            model.zero_grad()
        monitor.close()
    return root


def probe(*argv, cwd):
    source = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run(
        [sys.executable, "-c", source, *argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["demo", "--help"],
        ["runs"],
        ["runs", "runs", "--json"],
        ["show", "tiny"],
        ["show", "tiny", "--json"],
        ["report", "tiny", "-o", "report.html"],
    ],
    ids=" ".join,
)
def test_reading_commands_import_no_torch(run_dir, argv):
    result = probe(*argv, cwd=run_dir)
    assert result["code"] == 0, result["err"]
    assert result["heavy"] == [], f"`noisescale {' '.join(argv)}` imported {result['heavy'][:5]}"


def test_the_probe_sees_torch_where_it_is_imported(run_dir):
    """The check can fail: the demo's handler imports torch (before it refuses the run name, with exit code 1)."""
    result = probe("demo", "--name", "bad/name", "--dir", "runs", cwd=run_dir)
    assert result["code"] == 1 and "run name" in result["err"], result["err"]
    assert "torch" in result["heavy"]
