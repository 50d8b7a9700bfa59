"""What the dashboard must refuse: reading outside its folder, requests without its token, requests through a
foreign host name; bad query parameters get a clear 4xx, never a 500; markup in data stays data; it never writes."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="needs the dashboard extra: pip install 'noisescale[dashboard]'")
pytest.importorskip("uvicorn", reason="needs the dashboard extra: pip install 'noisescale[dashboard]'")

from tests.helpers.dashboard_http import request, url
from tests.helpers.training_runs import train_run

from noisescale.cli.main import main
from noisescale.dashboard import DashboardServer
from noisescale.dashboard import guard as guard_module
from noisescale.dashboard.server import STATIC, MissingDependencyError, _require, is_loopback

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret token/with;odd=chars&é"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("security")
    root = base / "runs"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    inside = train_run(root, name="inside", steps=12)
    secret = train_run(outside, name="secret", steps=12, events=False)
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.symlink(secret, root / "link-out.sqlite")  # a link from the folder to a run outside it
    os.symlink(inside, root / "link-in.sqlite")  # a link that stays inside is fine
    return {"root": root, "inside": inside, "secret": secret, "outside": outside}


@pytest.fixture(scope="module")
def server(layout):
    with DashboardServer(layout["root"], port=0).start() as s:
        yield s


@pytest.fixture(scope="module")
def guarded(layout):
    with DashboardServer(layout["root"], port=0, token=TOKEN).start() as s:
        yield s


def _files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- binding ---------------------------------------------------------------------------------------------------


def test_binds_to_loopback_by_default(layout):
    with DashboardServer(layout["root"], port=0) as s:
        assert s.host == "127.0.0.1" and s._sock.getsockname()[0] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_cli_says_so_when_not_on_loopback(layout, monkeypatch, capsys, host, warned):
    served = []
    monkeypatch.setattr(DashboardServer, "run", lambda self: served.append((self.host, self.port)))
    assert main(["dashboard", str(layout["root"]), "--host", host, "--port", "0"]) == 0
    err = capsys.readouterr()
    assert served and served[0][0] == host
    assert ("warning: listening on " + host in err.err) is warned
    assert "add --token" in err.err if warned else err.err.strip() == "noisescale dashboard: stopped"
    assert re.search(r"at http://127\.0\.0\.1:\d+/ ", err.out)


@pytest.mark.slow
def test_cli_serves_until_interrupted(layout):
    proc = subprocess.Popen(
        [sys.executable, "-m", "noisescale", "dashboard", str(layout["root"]), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
        assert request(port, "/api/runs").status == 200
        proc.send_signal(2)  # Ctrl+C
        assert proc.wait(timeout=20) == 0
        assert "stopped" in (proc.stderr.read() if proc.stderr else "")
    finally:
        proc.kill()
        proc.wait()


def test_port_in_use_is_a_clear_error(layout):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", str(layout["root"]), "--port", str(port)]) == 1
    assert main(["dashboard", str(layout["root"]), "--port", "70000"]) == 2


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette", None)  # makes `import starlette` fail
    with pytest.raises(ImportError, match=r"pip install 'noisescale\[dashboard\]'") as info:
        _require()
    assert isinstance(info.value, MissingDependencyError)


# -- only the folder's run files -------------------------------------------------------------------------------


TRAVERSALS = [
    "/api/runs/..%2F..%2Fetc%2Fpasswd",
    "/api/runs/../../etc/passwd",
    "/api/runs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/runs/..%252F..%252Fetc%252Fpasswd",
    "/api/runs/%2Fetc%2Fpasswd",
    "/api/runs/..",
    "/api/runs/.",
    "/api/runs/..%2Foutside%2Fpasswd",
    "/api/runs/..%2Foutside%2F{secret}",
    "/api/runs/{secret}",
    "/api/runs/{secret}/series",
    "/api/runs/..%5C..%5Cpasswd",
    "/api/compare?runs=../outside/{secret}",
    "/api/compare?runs=%2Fetc%2Fpasswd",
    "/api/compare?runs={secret}",
    "/static/..%2F..%2Fserver.py",
    "/static/../server.py",
    "/static/%2e%2e/%2e%2e/server.py",
    "/static/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "//etc/passwd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_nothing_outside_the_folder_is_served(server, layout, target):
    target = target.format(secret=layout["secret"].stem)
    answer = request(server.port, target)
    assert answer.status in (400, 403, 404), (target, answer.status)
    assert b"root:x:0" not in answer.body and b"SQLite format" not in answer.body
    assert b"def create_app" not in answer.body
    if answer.headers.get("content-type", "").startswith("application/json"):
        assert answer.json()["error"]


def test_links_out_of_the_folder_are_refused(server, layout):
    listed = request(server.port, "/api/runs").json()
    assert {r["file"] for r in listed["runs"]} == {layout["inside"].name, "link-in.sqlite"}
    refused = {u["file"]: u["error"] for u in listed["unreadable"]}
    assert "outside the dashboard's folder" in refused["link-out.sqlite"]
    for target in ("/api/runs/link-out", "/api/runs/link-out/series", "/api/runs/link-out.sqlite/events"):
        answer = request(server.port, target)
        assert answer.status == 403 and "outside" in answer.json()["error"], target
    assert request(server.port, "/api/compare?runs=link-out").status == 403
    assert request(server.port, "/api/runs/link-in/series").status == 200


def test_reading_never_writes(server, layout):
    before = _files_digest(layout["root"])
    rid = layout["inside"].stem
    for target in ("/api/runs", f"/api/runs/{rid}", f"/api/runs/{rid}/series", f"/api/runs/{rid}/layers",
                   f"/api/runs/{rid}/events", f"/api/runs/{rid}/updates", f"/api/runs/{rid}/stream"):  # fmt: skip
        assert request(server.port, target).status == 200
    assert _files_digest(layout["root"]) == before  # no byte changed, no -wal/-shm left beside finished runs


# -- token -----------------------------------------------------------------------------------------------------


def _all_targets(rid: str) -> list[str]:
    return [
        "/",
        "/index.html",
        "/static/app.js",
        "/static/vendor/uPlot.iife.min.js",
        "/api/openapi.json",
        "/api/runs",
        f"/api/runs/{rid}",
        f"/api/runs/{rid}/series",
        f"/api/runs/{rid}/layers",
        f"/api/runs/{rid}/events",
        f"/api/runs/{rid}/updates",
        f"/api/runs/{rid}/stream",
        f"/api/compare?runs={rid}",
        "/api/runs/nope",
        "/nothing-here",
    ]


def test_token_guards_every_endpoint(guarded, layout):
    rid = layout["inside"].stem
    for target in _all_targets(rid):
        for headers in ({}, {"X-Noisescale-Token": "wrong"}, {"Authorization": "Bearer " + TOKEN[:-1]}):
            answer = request(guarded.port, target, headers=headers)
            assert answer.status == 401, (target, headers)
            assert "token" in answer.json()["error"] and b"SQLite" not in answer.body
    sep = lambda t: "&" if "?" in t else "?"  # noqa: E731
    quoted = url("", {"token": TOKEN})[1:]
    for target in _all_targets(rid):
        expected = 404 if target in ("/api/runs/nope", "/nothing-here") else 200
        for how in ("bearer", "header", "query"):
            # http.client sends header text as Latin-1, as browsers do; UTF-8 bytes are accepted too.
            headers = {"Authorization": "Bearer " + TOKEN} if how == "bearer" else {}
            if how == "header":
                headers = {"X-Noisescale-Token": TOKEN.encode().decode("latin-1")}  # the UTF-8 bytes
            t = target + sep(target) + quoted if how == "query" else target
            assert request(guarded.port, t, headers=headers).status == expected, (target, how)
    assert request(guarded.port, url("/api/runs", {"token": TOKEN}) + "&token=x").status == 401


def test_page_opened_with_the_token_gets_a_cookie_for_its_scripts(guarded):
    page = request(guarded.port, "/" + url("", {"token": TOKEN}))
    assert page.status == 200
    cookie = page.headers["set-cookie"]
    assert (
        cookie.startswith(f"noisescale-token-{guarded.port}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    )
    pair = cookie.split(";")[0]
    assert request(guarded.port, "/static/app.js", headers={"Cookie": pair}).status == 200
    assert request(guarded.port, "/static/app.js", headers={"Cookie": pair + "x"}).status == 401
    other_port = pair.replace(str(guarded.port), str(guarded.port + 1), 1)
    assert request(guarded.port, "/static/app.js", headers={"Cookie": other_port}).status == 401


def test_token_is_compared_in_constant_time(guarded, monkeypatch):
    calls = []
    original = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(guard_module.hmac, "compare_digest", spy)
    assert request(guarded.port, "/api/runs", headers={"X-Noisescale-Token": "guess"}).status == 401
    assert calls == [(b"guess", TOKEN.encode())]


def test_foreign_host_names_are_refused(server):
    assert request(server.port, "/api/runs", host="localhost").status == 200
    for host in ("evil.example", "127.0.0.1.evil.example", "attacker"):
        answer = request(server.port, "/api/runs", host=host)
        assert answer.status == 400 and "Host" in answer.json()["error"], host


def test_answers_carry_a_strict_content_security_policy(server):
    for target in ("/", "/api/runs", "/static/app.js", "/nothing"):
        headers = request(server.port, target).headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


# -- bad parameters --------------------------------------------------------------------------------------------


BAD = [
    ("/api/runs/{rid}/series", {"points": "0"}, "points"),
    ("/api/runs/{rid}/series", {"points": "abc"}, "points"),
    ("/api/runs/{rid}/series", {"points": "1e400"}, "points"),
    ("/api/runs/{rid}/series", {"points": "99999999999999999999999999"}, "points"),
    ("/api/runs/{rid}/series", {"after": "-7"}, "after"),
    ("/api/runs/{rid}/series", {"columns": "b_simple,nope"}, "columns"),
    ("/api/runs/{rid}/series", {"columns": "b_simple,,grad_sq"}, "columns"),
    ("/api/runs/{rid}/series", {"columns": "b_simple; DROP TABLE run"}, "columns"),
    ("/api/runs/{rid}/series", {"point": "10"}, "point"),
    ("/api/runs/{rid}/layers", {"column": "batch_size"}, "column"),
    ("/api/runs/{rid}/layers", {"kind": "everything"}, "kind"),
    ("/api/runs/{rid}/layers", {"agg": "median"}, "agg"),
    ("/api/runs/{rid}/layers", {"limit": "0"}, "limit"),
    ("/api/runs/{rid}/layers", {"order": "random"}, "order"),
    ("/api/runs/{rid}/events", {"after": "x"}, "after"),
    ("/api/runs/{rid}/events", {"limit": "100001"}, "limit"),
    ("/api/runs/{rid}/updates", {"step": "-2"}, "step"),
    ("/api/runs/{rid}/updates", {"metric_id": "1.5"}, "metric_id"),
    ("/api/runs/{rid}/stream", {"interval": "0"}, "interval"),
    ("/api/runs/{rid}/stream", {"interval": "nan"}, "interval"),
    ("/api/compare", {}, "runs"),
    ("/api/compare", {"runs": "{rid}", "column": "b_simple", "metric": "loss"}, "metric"),
    ("/api/compare", {"runs": "{rid}", "metric": "a,b"}, "metric"),
    ("/api/compare", {"runs": ",".join(["{rid}"] * 2) + "," + ",".join(f"r{i}" for i in range(70))}, "runs"),
    ("/api/runs", {"verbose": "1"}, "verbose"),
    ("/api/openapi.json", {"x": "1"}, "x"),
]


@pytest.mark.parametrize(("path", "params", "name"), BAD)
def test_bad_parameters_get_a_clear_400(server, layout, path, params, name):
    rid = layout["inside"].stem
    target = url(path.format(rid=rid), {k: v.format(rid=rid) for k, v in params.items()})
    answer = request(server.port, target)
    assert answer.status == 400, (target, answer.status, answer.body)
    body = answer.json()
    assert body["status"] == 400 and name in body["error"], body
    if body["parameter"] is not None:
        assert body["parameter"] == name


def test_duplicated_and_strange_parameters_never_give_a_500(server, layout):
    rid = layout["inside"].stem
    values = ["", "-1", "0", "1", "1e3", "inf", "-inf", "nan", "%00", "\x00", "🙂", "a" * 2000, "1,2", "..", "'"]
    endpoints = {
        f"/api/runs/{rid}/series": ("columns", "metrics", "points", "after"),
        f"/api/runs/{rid}/layers": ("column", "kind", "points", "agg", "limit", "order"),
        f"/api/runs/{rid}/events": ("kind", "after", "limit"),
        f"/api/runs/{rid}/updates": ("columns", "step", "metric_id", "event_id", "limit"),
        "/api/compare": ("runs", "column", "metric", "points"),
    }
    statuses = set()
    for path, names in endpoints.items():
        for name in names:
            for value in values:
                answer = request(server.port, url(path, {name: value}))
                statuses.add(answer.status)
                assert answer.status in (200, 400, 404), (path, name, value, answer.status)
                if answer.status != 200:
                    assert answer.json()["error"]
            twice = request(server.port, url(path, {name: "1"}) + f"&{name}=2")
            assert twice.status in (200, 400, 404)
    assert statuses >= {200, 400}


def test_page_code_never_parses_data_as_html():
    code = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "srcdoc"):
        assert sink not in code, sink
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and "https://" not in html and "http://" not in html  # no inline code, no CDN


def test_closing_the_server_ends_open_streams(tmp_path):
    from tests.helpers.dashboard_http import sse_events

    from noisescale.store import Run

    with Run("open", dir=tmp_path) as run:  # running: its stream stays open, waiting for rows
        run.log(1, {"loss": 1.0})
        run.flush()
        server = DashboardServer(tmp_path, port=0, poll_interval=0.05).start()
        events = sse_events(server.port, f"/api/runs/{run.path.stem}/stream", timeout=30)
        assert next(events)[0] == "update"
        start = time.monotonic()
        server.close()
        assert list(events) == [] and time.monotonic() - start < 5
