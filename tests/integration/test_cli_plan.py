"""``noisescale plan RUN``: the table, --json, --png, bad input and exit codes."""

import ast
import json
import re
import sys
from pathlib import Path

import pytest
from tests.helpers.plan_runs import write_run

from noisescale.cli.main import main

PLAN_MODULE = Path(__file__).resolve().parents[2] / "src" / "noisescale" / "cli" / "plan.py"


def one_line_error(err, *, prefix="noisescale: error: "):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return str(write_run(root, noise=lambda s: 16.0 if s <= 200 else 128.0, loss=lambda s: 1.0 - s / 500))


def test_table(run_path, capsys):
    assert main(["plan", run_path, "--batches", "8,32,512", "--follow", "0.5,1", "--stretches", "4"]) == 0
    out = capsys.readouterr().out
    assert "took      400 steps, 12,800 examples, batch 32, to its end" in out
    for name in ("this run", "batch 8", "batch 32", "batch 512", "ramp 16->128 over 12,800 ex", "1 x B_simple"):
        assert f"\n{name} " in out, name
    assert "critical batch over training" in out and "assumptions" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^ +[1-4] +\d+% ", line)]
    assert [r[1] for r in rows] == ["25%", "50%", "75%", "100%"]
    # 100 steps of 32 at B_noise 16: dS_min 66.7 twice; at 128: 20 twice -> at batch 8: 2 * (66.7 + 133.3) + 2 * 340
    line = next(line for line in out.splitlines() if line.startswith("batch 8 "))
    by_hand = 2 * (66.67 + 1066.7 / 8) + 2 * (20 + 2560 / 8)
    assert int(line.split()[3].replace(",", "")) == pytest.approx(by_hand, rel=0.03)


def test_json_schema(run_path, capsys):
    args = ["plan", run_path, "--json", "--target-loss", "0.6", "--loss-window", "32", "--batches", "16,64"]
    args += ["--devices", "4", "--micro-batch", "8", "--step-time", "8:0.01", "--step-time", "32:0.016"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {
        "run",
        "target_loss",
        "loss_window",
        "reference",
        "model",
        "schedules",
        "stretches",
        "critical_batch",
        "warnings",
        "step_time",
        "assumptions",
    }
    assert doc["target_loss"] == 0.6 and doc["reference"]["steps"] == 200
    assert set(doc["model"]) == {
        "min_steps",
        "min_examples",
        "min_steps_range",
        "min_examples_range",
        "critical_batch",
        "frontier",
        "best_steps_at_run_examples",
    }
    names = [s["name"] for s in doc["schedules"]]
    assert names[:3] == ["this run", "batch 16", "batch 64"] and names[-1] == "4 dev x 8"
    for s in doc["schedules"]:
        assert set(s) >= {"name", "kind", "steps", "examples", "time_s", "steps_range", "examples_range"}
        assert s["steps_range"][0] <= s["steps"] <= s["steps_range"][1]
        assert s["time_s"] > 0
    dev = doc["schedules"][-1]
    assert dev["kind"] == "devices" and dev["params"] == {"devices": 4, "micro_batch": 8, "accumulation": 1}
    # 32 examples over 4 devices: one pass of 8 each, t0 + t1 * 8 = 0.01 s per step
    assert dev["time_s"] == pytest.approx(dev["steps"] * 0.01)
    st = doc["step_time"]
    assert (st["t0"], st["t1"], st["devices"], st["micro_batch"]) == (pytest.approx(0.008), pytest.approx(2.5e-4), 4, 8)
    assert {"fraction", "loss", "b_simple", "b_simple_low", "b_simple_high", "batch"} <= set(
        doc["critical_batch"]["by_fraction"][0]
    )
    assert doc["critical_batch"]["by_loss"][-1]["loss"] == pytest.approx(0.6)
    assert all(set(w) == {"code", "message", "fraction"} for w in doc["warnings"])


@pytest.mark.slow  # importing matplotlib and drawing: a few seconds
def test_png(run_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    assert main(["plan", run_path, "--png", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays pure JSON
    assert captured.err.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_png_without_matplotlib_names_the_extra(run_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plan", run_path, "--png", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    one_line_error(err)
    assert "pip install 'noisescale[report]'" in err
    assert not (tmp_path / "p.png").exists()


def test_refusals_exit_1_with_one_line(tmp_path, capsys):
    short = write_run(tmp_path / "short", noise=32.0, steps=10)
    assert main(["plan", str(short)]) == 1
    err = capsys.readouterr().err
    one_line_error(err)
    assert "too short to plan from" in err
    noisy = write_run(tmp_path / "noisy", noise=32.0, spread=20.0, steps=200)
    assert main(["plan", str(noisy), "--stretches", "5"]) == 1
    err = capsys.readouterr().err
    one_line_error(err)
    assert "too noisy to plan from" in err
    assert main(["plan", str(tmp_path / "missing.sqlite")]) == 1
    one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ramp", "8-64"], "expected START:END"),
        (["--batches", "0,8"], "positive batch sizes"),
        (["--follow", "x"], "positive numbers"),
        (["--step-time", "32"], "SIZE:SECONDS"),
        (["--stretches", "0"], "positive integer"),
        (["--devices", "4"], "--devices needs --micro-batch"),
        (["--micro-batch", "4"], "--micro-batch needs --devices"),
        (["--step-time", "32:0.1"], "--step-time needs two measurements"),
        (["--min-batch", "64", "--max-batch", "8"], "--max-batch must be >= --min-batch"),
    ],
)
def test_usage_errors_exit_2(run_path, capsys, extra, message):
    assert main(["plan", run_path, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_step_time_fit_exits_1(run_path, capsys):
    assert main(["plan", run_path, "--step-time", "8:0.02", "--step-time", "32:0.01"]) == 1
    err = capsys.readouterr().err
    one_line_error(err)
    assert "fall as the size grows" in err


def test_help_lists_plan(capsys):
    assert main(["--help"]) == 0
    assert "plan" in capsys.readouterr().out
    assert main(["plan", "--help"]) == 0
    assert "usage: noisescale plan" in capsys.readouterr().out


def test_the_command_module_imports_nothing_heavy_at_module_level():
    tree = ast.parse(PLAN_MODULE.read_text())
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append(node.module or "")
    assert top and all(
        m.split(".")[0] in sys.stdlib_module_names or m == "__future__" or m.startswith("noisescale.cli.") for m in top
    ), top
