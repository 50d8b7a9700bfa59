"""``noisescale demo --dashboard``: the dashboard serves the demo's folder while it trains, and stops after."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette", reason="needs the dashboard extra: pip install 'noisescale[dashboard]'")
pytest.importorskip("uvicorn", reason="needs the dashboard extra: pip install 'noisescale[dashboard]'")

from tests.helpers.dashboard_http import request
from tests.helpers.training_runs import train_run

import noisescale.demo as demo_package
from noisescale.cli.main import main
from noisescale.dashboard.server import DashboardServer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_serves_the_dashboard_beside_its_training(tmp_path, monkeypatch, capsys):
    seen: dict[str, object] = {}
    started: list[DashboardServer] = []
    original_start = DashboardServer.start

    def start(self, timeout=10.0):
        started.append(self)
        return original_start(self, timeout)

    def fake_demo(options, *, stream=None):
        # A real (tiny) training in the demo's folder, with the dashboard's address already printed.
        err = capsys.readouterr().err
        port = int(re.search(r"live dashboard at http://127\.0\.0\.1:(\d+)/", err).group(1))  # type: ignore[union-attr]
        path = train_run(Path(options.dir), name="demo", steps=8, events=False)
        seen["runs"] = request(port, "/api/runs").json()["runs"]
        seen["path"] = path
        return SimpleNamespace(path=path)

    monkeypatch.setattr(DashboardServer, "start", start)
    monkeypatch.setattr(demo_package, "run_demo", fake_demo)
    monkeypatch.setattr(sys, "stdin", None)  # nobody at the terminal: the server must not linger
    code = main(["demo", "--dir", str(tmp_path / "runs"), "--dashboard", "--dashboard-port", "0", "-q"])
    assert code == 0 and capsys.readouterr().out.strip() == str(seen["path"])
    assert [r["file"] for r in seen["runs"]] == [Path(str(seen["path"])).name]  # type: ignore[index]
    assert len(started) == 1 and started[0]._thread is None  # closed after the demo


def test_a_failed_demo_stops_the_dashboard(tmp_path, monkeypatch, capsys):
    started: list[DashboardServer] = []
    original_start = DashboardServer.start
    monkeypatch.setattr(
        DashboardServer, "start", lambda self, timeout=10.0: started.append(self) or original_start(self)
    )

    def fake_demo(options, *, stream=None):
        raise demo_package.DemoError("no data here")

    monkeypatch.setattr(demo_package, "run_demo", fake_demo)
    assert main(["demo", "--dir", str(tmp_path), "--dashboard", "--dashboard-port", "0", "-q"]) == 1
    assert "no data here" in capsys.readouterr().err and started[0]._thread is None


def test_dashboard_help_names_the_security_defaults(capsys):
    assert main(["dashboard", "--help"]) == 0
    text = capsys.readouterr().out
    assert "127.0.0.1" in text and "--token" in text and "NOISESCALE_DASHBOARD_TOKEN" in text


def test_the_adaptive_demo_serves_the_dashboard_and_stops_it_when_it_fails(tmp_path, monkeypatch, capsys):
    import noisescale.demo.adaptive as adaptive_demo

    started: list[DashboardServer] = []
    original_start = DashboardServer.start
    monkeypatch.setattr(
        DashboardServer, "start", lambda self, timeout=10.0: started.append(self) or original_start(self)
    )

    def fake_adaptive(options, *, stream=None):
        assert started and started[0]._thread is not None  # serving while it trains
        raise demo_package.DemoError("no data here")

    monkeypatch.setattr(adaptive_demo, "run_adaptive_demo", fake_adaptive)
    code = main(["demo", "--adaptive", "--dir", str(tmp_path), "--dashboard", "--dashboard-port", "0", "-q"])
    assert code == 1 and "no data here" in capsys.readouterr().err and started[0]._thread is None
