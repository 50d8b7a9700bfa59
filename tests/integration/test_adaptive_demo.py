"""``noisescale demo --adaptive`` end to end, and what ``show`` and ``report`` draw of a controlled run."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from noisescale.cli.main import main
from noisescale.store import open_run


@pytest.fixture(scope="module")
def adaptive_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["demo", "--adaptive", "--steps", "300", "--dir", str(root)])
    assert code == 0
    return root, out.getvalue()


@pytest.mark.slow
def test_the_table_compares_steps_examples_and_losses(adaptive_demo):
    _, text = adaptive_demo
    steps = re.search(r"optimizer steps\s+([\d,]+)\s+([\d,]+)", text)
    examples = re.search(r"examples\s+([\d,]+)\s+([\d,]+)", text)
    assert steps and examples and "final training loss" in text and "held-out accuracy" in text
    fixed_steps, ctrl_steps = (int(v.replace(",", "")) for v in steps.groups())
    fixed_ex, ctrl_ex = (int(v.replace(",", "")) for v in examples.groups())
    assert fixed_steps == 300 and fixed_ex == 300 * 32
    assert fixed_ex - 512 < ctrl_ex <= fixed_ex and ctrl_steps < fixed_steps  # the batch grew
    paths = re.findall(r"noisescale show (\S+)", text)
    assert len(paths) == 2
    with open_run(paths[1]) as reader:
        cfg = reader.info.config
        assert (cfg["schedule"], cfg["batch_size"], cfg["lr"]) == ("gns", None, 0.2)
        events = [e for e in reader.events() if e["kind"] == "controller"]
        assert events and events[0]["data"]["before"]["batch_size"] == 32
        assert {"lr", "lr_scale", "loss"} <= set(reader.metric_names())
        assert len({r["batch_size"] for r in reader.measurements()}) >= 2


@pytest.mark.slow
def test_show_and_report_draw_the_batch_and_learning_rate(adaptive_demo, tmp_path, capsys):
    _, text = adaptive_demo
    path = re.findall(r"noisescale show (\S+)", text)[1]
    assert main(["show", path]) == 0
    shown = capsys.readouterr().out
    assert "batch size and learning rate over examples seen" in shown
    rows = shown.split("batch size and learning rate over examples seen")[1].splitlines()[3:]
    batches = [int(r.split()[2].replace(",", "")) for r in rows if r.strip()]
    assert batches[0] == 32 and max(batches) > 32
    out = tmp_path / "r.html"
    assert main(["report", path, "-o", str(out)]) == 0
    html = out.read_text()
    assert "<h2>Batch size and learning rate</h2>" in html and 'aria-label="learning rate"' in html


def test_adaptive_refuses_other_tasks(capsys):
    assert main(["demo", "--adaptive", "--task", "charlm"]) == 1
    assert "--adaptive trains the digits task" in capsys.readouterr().err
