"""The ``noisescale`` command end to end: demo -> show --json -> report -> runs, bad input, exit codes."""

import hashlib
import io
import json
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from noisescale.cli.main import build_parser, main
from noisescale.demo import DemoOptions, run_demo
from noisescale.demo.explain import explain, sources_agree
from noisescale.demo.progress import ProgressBar
from noisescale.store import open_run
from noisescale.store.schema import SCHEMA_VERSION

CLI = [sys.executable, "-m", "noisescale.cli.main"]


def cli(*args, cwd):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noisescale: error: "), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short digits demo, run through the real entry point in a subprocess."""
    root = tmp_path_factory.mktemp("cli")
    proc = cli("demo", "--steps", "40", "--dir", str(root / "runs"), "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar without a terminal, no warnings
    path = proc.stdout.strip()
    assert path.endswith(".sqlite") and "\n" not in path
    return root, path


def test_demo_writes_a_run_that_show_json_reads_back(demo_run, capsys):
    _, path = demo_run
    assert main(["show", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = doc["summary"]
    assert (s["name"], s["status"], s["steps"], s["examples"], s["batch_size"]) == ("digits", "finished", 40, 5120, 128)
    assert s["source"] == "example" and s["coverage"] == 1.0
    series = doc["series"]
    assert series["step"] == list(range(1, 41)) and series["examples"] == [128 * i for i in range(1, 41)]
    for col in ("b_simple", "b_simple_low", "b_simple_high", "b_simple_raw", "grad_sq", "trace_cov"):
        assert len(series[col]) == 40
    assert all(v > 0 for v in series["b_simple"][5:])
    assert len(doc["metrics"]["loss"]["value"]) == 40 and "test_accuracy" in doc["metrics"]
    assert set(doc["layers"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert doc["summary"]["config"]["task"] == "digits"


def test_show_text_runs_and_lookup_by_name_and_id(demo_run, capsys):
    root, path = demo_run
    run_id = open_run(path).info.id
    for ref in ("digits", run_id):
        assert main(["show", ref, "--dir", str(root / "runs")]) == 0
        out = capsys.readouterr().out
        assert "B_simple" in out and run_id in out and "4.weight" in out
    assert main(["runs", str(root / "runs")]) == 0
    out = capsys.readouterr().out
    assert run_id in out and "finished" in out


def test_report_writes_one_self_contained_html_file(demo_run, tmp_path, capsys):
    _, path = demo_run
    out = tmp_path / "report.html"
    before = digest(__import__("pathlib").Path(path))
    assert main(["report", path, "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    assert page.count("<svg") == 15 and "per parameter tensor" in page  # five charts, three x axes each
    assert digest(__import__("pathlib").Path(path)) == before  # reading never writes
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind


def test_report_png_or_a_clear_message(demo_run, tmp_path, capsys):
    _, path = demo_run
    out = tmp_path / "r.png"
    rc = main(["report", path, "--png", "-o", str(out)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 1
        err = capsys.readouterr().err
        one_line_error(err)
        assert "pip install 'noisescale[report]'" in err
        assert not out.exists() and list(tmp_path.iterdir()) == []
    else:
        assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_png_without_matplotlib_names_the_extra(demo_run, tmp_path):
    """Through the real entry point, with matplotlib made unimportable: one line, exit 1, no file."""
    _, path = demo_run
    out = tmp_path / "r.png"
    blocked = "import sys; sys.modules['matplotlib'] = None; from noisescale.cli.main import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", blocked, "report", path, "--png", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    one_line_error(proc.stderr)
    assert "pip install 'noisescale[report]'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_refuses_to_overwrite_the_run_file(demo_run, capsys):
    _, path = demo_run
    import pathlib

    before = digest(pathlib.Path(path))
    assert main(["report", path, "-o", path]) == 1
    one_line_error(capsys.readouterr().err)
    assert digest(pathlib.Path(path)) == before


def _make_bad(kind, good, bad):
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("not a database at all\n")
    elif kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif kind == "newer":
        shutil.copy(good, bad)
        conn = sqlite3.connect(bad, isolation_level=None)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 0)", (SCHEMA_VERSION + 1,))
        conn.close()


@pytest.mark.parametrize("command", ["show", "report", "show-json"])
@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated", "newer"])
def test_bad_run_files_give_one_line_and_exit_1(demo_run, tmp_path, capsys, command, kind):
    import pathlib

    good = pathlib.Path(demo_run[1])
    bad = tmp_path / "bad.sqlite"
    if kind != "missing":
        _make_bad(kind, good, bad)
    before = digest(bad) if bad.exists() else None
    good_before = digest(good)
    args = {"show": ["show", str(bad)], "show-json": ["show", str(bad), "--json"],
            "report": ["report", str(bad), "-o", str(tmp_path / "r.html")]}[command]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    one_line_error(captured.err)
    assert captured.out == ""
    assert (digest(bad) if bad.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["bad.sqlite"])
    assert digest(good) == good_before


def test_errors_through_the_real_entry_point(tmp_path):
    proc = cli("show", "nothing-here", "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    one_line_error(proc.stderr)
    assert "no run 'nothing-here'" in proc.stderr


def test_runs_reports_unreadable_files_and_exits_1(demo_run, tmp_path, capsys):
    shutil.copy(demo_run[1], tmp_path)
    (tmp_path / "junk.sqlite").write_text("junk")
    assert main(["runs", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "digits" in captured.out and "junk.sqlite" in captured.err and "Traceback" not in captured.err
    assert (tmp_path / "junk.sqlite").read_text() == "junk"


@pytest.mark.parametrize("name", ["a/b", "<b>bold</b>", "x&y"])
def test_bad_run_names_from_the_cli(tmp_path, capsys, name):
    assert main(["demo", "--steps", "2", "--name", name, "--dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    one_line_error(err)
    assert "run name" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ([], 2),
        (["bogus"], 2),
        (["show"], 2),
        (["report"], 2),
        (["demo", "--steps", "0"], 2),
        (["demo", "--batch-size", "many"], 2),
        (["demo", "--task", "imagenet"], 2),
        (["--help"], 0),
        (["--version"], 0),
        (["demo", "--help"], 0),
        (["show", "--help"], 0),
        (["report", "--help"], 0),
        (["runs", "--help"], 0),
    ],
)
def test_exit_codes(args, code, capsys):
    assert main(args) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 0 and "--help" in args:
        assert "usage:" in captured.out


def test_runs_of_a_missing_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 1
    one_line_error(capsys.readouterr().err)


def test_missing_scikit_learn_names_the_demo_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # `from sklearn.datasets import ...` fails
    assert main(["demo", "--dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    one_line_error(err)
    assert "noisescale[demo]" in err and "--task charlm" in err


def test_default_digits_demo_shows_growth_in_the_published_range_and_sources_agree(tmp_path):
    """The demo's claims, measured on the default settings and seed (with the micro-batch source beside)."""
    result = run_demo(DemoOptions(dir=str(tmp_path), compare_sources=True, progress=False))
    b = result.summary["b_simple"]
    assert 10 <= b["first_fifth"] < 100  # tens at the start ...
    assert 200 <= b["last_fifth"] < 2000  # ... hundreds later (McCandlish et al.: MNIST ~900 on average)
    assert b["last_fifth"] / b["first_fifth"] >= 4  # grows several times as the loss falls
    assert result.summary["loss"]["last_fifth"] < 0.2 * result.summary["loss"]["first_fifth"]
    assert result.final["test_accuracy"] > 0.9
    # per-example and micro-batch sources, same steps: bands overlap everywhere, windows within 20 %
    assert sources_agree(result), result.checkpoints
    mb_first, mb_last = result.microbatch_window
    assert mb_first == pytest.approx(b["first_fifth"], rel=0.2) and mb_last == pytest.approx(b["last_fifth"], rel=0.2)
    text = explain(result)
    assert "agree within their bands" in text and f"noisescale report {result.path}" in text


def test_charlm_demo_trains_on_the_standard_library(tmp_path):
    result = run_demo(DemoOptions(task="charlm", dir=str(tmp_path), steps=3, batch_size=4, progress=False))
    s = result.summary
    assert s["steps"] == 3 and s["examples"] == 12 and s["config"]["corpus_bytes"] > 100_000
    assert s["coverage"] > 0.5 and "test_loss" in result.final


def test_progress_bar_draws_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar(10, stream=stream, interval=0.0)
        for step in range(1, 11):
            bar.update(step, loss=0.5, b_simple=123.0, band=(100.0, float("inf")))
        bar.close()
    assert pipe.getvalue() == ""
    assert "\r" in tty.getvalue() and "B_simple 123 [100, inf]" in tty.getvalue() and tty.getvalue().endswith("\n")
    quiet = Tty()
    ProgressBar(10, stream=quiet, enabled=False).update(10, loss=None, b_simple=None, band=None)
    assert quiet.getvalue() == ""


def test_the_commands_default_folder_is_the_stores():
    from noisescale.cli.args import DEFAULT_DIR
    from noisescale.store import DEFAULT_DIR as STORE_DEFAULT_DIR

    assert DEFAULT_DIR == STORE_DEFAULT_DIR
    for command in (["show", "x"], ["report", "x"], ["runs"], ["demo"], ["export", "x", "--to", "csv"]):
        assert build_parser().parse_args(command).dir == DEFAULT_DIR


class Recording(io.StringIO):
    """A stream that remembers, for each write, whether a flush came before the next write."""

    def __init__(self, tty=False):
        super().__init__()
        self.tty = tty
        self.writes = []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.writes.append([text, False])
        return super().write(text)

    def flush(self):
        if self.writes:
            self.writes[-1][1] = True
        super().flush()


def test_without_a_terminal_the_demo_prints_a_flushed_line_per_tenth(tmp_path):
    out, err = Recording(), Recording()
    run_demo(DemoOptions(dir=str(tmp_path), steps=20, batch_size=16), stream=err, out=out)
    assert err.getvalue() == ""  # no bar without a terminal
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("noisescale demo: training digits, 20 steps of batch 16")
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == [f"{2 * i}/20" for i in range(1, 11)]
    assert all("loss " in s and "B_simple " in s for s in steps)
    assert all(flushed for _, flushed in out.writes)  # each line reaches a pipe as it is written


def test_on_a_terminal_the_bar_alone_shows_progress(tmp_path):
    out, err = Recording(tty=True), Recording(tty=True)
    run_demo(DemoOptions(dir=str(tmp_path), steps=6, batch_size=16), stream=err, out=out)
    assert out.getvalue() == "" and "\r" in err.getvalue()
    quiet_out = Recording()
    run_demo(DemoOptions(dir=str(tmp_path), steps=6, batch_size=16, progress=False), stream=err, out=quiet_out)
    assert quiet_out.getvalue() == ""
