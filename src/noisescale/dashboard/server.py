"""``noisescale dashboard``'s web server: Starlette routes over ``api``, the static page, and the live stream.

Needs the ``dashboard`` extra (Starlette and uvicorn), imported only when a server is made.  The API is
read-only; blocking SQLite reads run in Starlette's thread pool, so a slow query never stalls the event loop.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from noisescale.dashboard import api
from noisescale.dashboard.catalog import RunDirectory
from noisescale.dashboard.guard import Guard
from noisescale.dashboard.openapi import openapi_document
from noisescale.dashboard.params import ApiError, Query
from noisescale.errors import NoiseScaleError

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DashboardError",
    "DashboardServer",
    "MissingDependencyError",
    "create_app",
    "is_loopback",
    "render_json",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


class MissingDependencyError(NoiseScaleError, ImportError):
    """The dashboard's optional packages are not installed; the message says how to install them."""


class DashboardError(NoiseScaleError, OSError):
    """The dashboard cannot start (the port is taken, the address cannot be bound)."""


def _require() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"the noisescale dashboard needs Starlette and uvicorn ({e.name} is missing): "
            "pip install 'noisescale[dashboard]'"
        ) from None


def render_json(doc: Any) -> bytes:
    """``doc`` as compact JSON, infinities as ``"inf"``/``"-inf"`` and NaN as ``null`` (JSON has neither)."""
    return json.dumps(_finite(doc), separators=(",", ":"), allow_nan=False).encode()


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(
    dir: str | os.PathLike[str],
    *,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] | None = None,
    port: int | None = None,
    poll_interval: float = 0.5,
    stopping: threading.Event | None = None,
) -> Any:
    """The dashboard as an ASGI application over the run files in ``dir``.

    Args:
        dir: the folder of run files.
        token: when set, every request must carry it (see ``guard``).
        allowed_hosts: the ``Host`` names answered (``None``: any; set it when listening on loopback only).
        port: the port it listens on (names the token cookie).
        poll_interval: default seconds between two looks at a file for the live stream.
        stopping: set it to end every live stream (a server shutting down).

    Raises:
        MissingDependencyError: Starlette or uvicorn is missing.
        noisescale.store.StoreError: ``dir`` is not a folder.
    """
    _require()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from noisescale.version import __version__

    directory = RunDirectory(dir)
    stop = stopping if stopping is not None else threading.Event()
    openapi = render_json(openapi_document(__version__))

    def json_response(doc: Any, status: int = 200) -> Response:
        return Response(
            render_json(doc), status_code=status, media_type="application/json", headers={"cache-control": "no-store"}
        )

    def error_response(e: ApiError) -> Response:
        return json_response(e.to_dict(), e.status)

    def endpoint(name: str, fn: Callable[..., dict[str, Any]], *, per_run: bool = True) -> Callable[..., Any]:
        async def handle(request: Request) -> Response:
            try:
                query = Query(request.query_params.multi_items(), allowed=api.PARAMETERS[name])
                args = (directory, request.path_params["run"], query) if per_run else (directory, query)
                doc = await run_in_threadpool(fn, *args)
            except ApiError as e:
                return error_response(e)
            return json_response(doc)

        return handle

    async def stream(request: Request) -> Response:
        ref = request.path_params["run"]
        try:
            query = Query(request.query_params.multi_items(), allowed=api.PARAMETERS["stream"])
            params = api.update_params(query)
            interval = query.number("interval", poll_interval, low=0.05, high=60.0)
            resume = request.headers.get("last-event-id")
            if resume:
                params.update(_parse_cursor(resume))
            await run_in_threadpool(directory.find, ref)  # 404 before the stream starts
        except ApiError as e:
            return error_response(e)
        return StreamingResponse(
            _feed(ref, params, interval),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _feed(ref: str, params: dict[str, Any], interval: float) -> AsyncIterator[bytes]:
        import anyio

        first = True
        last_sent = time.monotonic()
        while not stop.is_set():
            try:
                doc = await run_in_threadpool(lambda: api.updates_since(directory, ref, **params))
            except ApiError as e:
                yield _sse("error", e.to_dict())
                return
            m = doc["measurements"]
            new = doc["reset"] or bool(doc["events"] or doc["metrics"] or m["step"])
            if new or first:
                c = doc["cursor"]
                params.update(step=c["step"], metric_id=c["metric_id"], event_id=c["event_id"])
                yield _sse("update", doc, event_id=f"{c['step']}:{c['metric_id']}:{c['event_id']}")
                last_sent = time.monotonic()
                first = False
            elif time.monotonic() - last_sent > KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last_sent = time.monotonic()
            if doc["status"] != "running" and not new:
                yield _sse("end", {"status": doc["status"], "cursor": doc["cursor"]})
                return
            end = time.monotonic() + interval
            while not stop.is_set() and time.monotonic() < end:
                await anyio.sleep(min(0.1, interval))

    async def compare(request: Request) -> Response:
        try:
            query = Query(request.query_params.multi_items(), allowed=api.PARAMETERS["compare"])
            doc = await run_in_threadpool(api.compare, directory, query)
        except ApiError as e:
            return error_response(e)
        return json_response(doc)

    async def openapi_json(request: Request) -> Response:
        try:
            Query(request.query_params.multi_items(), allowed=())
        except ApiError as e:
            return error_response(e)
        return Response(openapi, media_type="application/json", headers={"cache-control": "no-store"})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        if status == 404:
            message = f"no such page or endpoint: {request.url.path!r} (the API is described at /api/openapi.json)"
        elif status == 405:
            message = f"{request.method} is not allowed here: the API is read-only (GET only)"
        else:
            message = str(getattr(exc, "detail", "")) or "request refused"
        return json_response({"error": message, "status": status, "parameter": None}, status)

    async def server_error(request: Request, exc: Exception) -> Response:
        return json_response({"error": f"internal error: {type(exc).__name__}: {exc}", "status": 500,
                              "parameter": None}, 500)  # fmt: skip

    routes = [
        Route("/", index),
        Route("/index.html", index),
        Route("/api/runs", endpoint("runs", api.runs, per_run=False)),
        Route("/api/runs/{run}", endpoint("run", api.run)),
        Route("/api/runs/{run}/series", endpoint("series", api.series)),
        Route("/api/runs/{run}/layers", endpoint("layers", api.layers)),
        Route("/api/runs/{run}/events", endpoint("events", api.events)),
        Route("/api/runs/{run}/updates", endpoint("updates", api.updates)),
        Route("/api/runs/{run}/stream", stream),
        Route("/api/compare", compare),
        Route("/api/openapi.json", openapi_json),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    return Guard(app, token=token, allowed_hosts=allowed_hosts, port=port)


def _parse_cursor(text: str) -> dict[str, int]:
    parts = text.split(":")
    try:
        step, metric_id, event_id = (int(p) for p in parts)
    except ValueError:
        raise ApiError(
            400, f"Last-Event-ID must be 'step:metric_id:event_id' (three integers), got {text[:80]!r}"
        ) from None
    if step < -1 or metric_id < 0 or event_id < 0:
        raise ApiError(400, f"Last-Event-ID holds a negative cursor: {text[:80]!r}")
    return {"step": step, "metric_id": metric_id, "event_id": event_id}


def _sse(event: str, doc: Any, *, event_id: str | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head.encode() + b"data: " + render_json(doc) + b"\n\n"


class DashboardServer:
    """The dashboard on a socket, served from a background thread (``start``) or the calling one (``run``).

    Args:
        dir: the folder of run files.
        host: the address to listen on (default 127.0.0.1: this machine only).
        port: the port (0: any free port; ``port`` holds the one chosen).
        token: when set, every request must carry it.
        poll_interval: seconds between two looks at a file being written, for the live stream.

    Raises:
        MissingDependencyError: Starlette or uvicorn is missing.
        DashboardError: the address cannot be bound (port taken, unknown host).
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        poll_interval: float = 0.5,
        log_level: str = "warning",
    ) -> None:
        _require()
        import uvicorn

        if token is not None and not token:
            raise DashboardError("the token is empty: give a non-empty --token, or none")
        self.dir = Path(dir)
        self.host = host
        self.token = token
        self._stopping = threading.Event()
        self._sock = _bind(host, port)
        self.port = int(self._sock.getsockname()[1])
        loopback = is_loopback(host)
        self.app = create_app(
            dir,
            token=token,
            allowed_hosts=(*LOOPBACK_NAMES, host) if loopback else None,
            port=self.port,
            poll_interval=poll_interval,
            stopping=self._stopping,
        )
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (with the token, when there is one)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        base = f"http://{host}:{self.port}/"
        if self.token:
            import urllib.parse

            base += "?token=" + urllib.parse.quote(self.token, safe="")
        return base

    def start(self, timeout: float = 10.0) -> DashboardServer:
        """Serve from a daemon thread; returns once it answers (``DashboardError`` if it did not start)."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="noisescale-dashboard", daemon=True
        )
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise DashboardError(f"the dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def run(self) -> None:
        """Serve from this thread until Ctrl+C (uvicorn handles the signal)."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._stopping.set()
            self._sock.close()

    def linger(self, *, stream: TextIO | None = None) -> None:
        """Keep serving from the background thread until Ctrl+C when a person is at the terminal (stdin is a
        TTY), then stop; without one, stop now (a script must not hang)."""
        out = sys.stderr if stream is None else stream
        try:
            if sys.stdin is not None and sys.stdin.isatty():
                print(f"noisescale: the dashboard stays up at {self.url}; Ctrl+C to stop it", file=out, flush=True)
                while self._thread is not None and self._thread.is_alive():
                    self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """End every live stream and stop the server (idempotent)."""
        self._stopping.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DashboardError(f"cannot listen on {host!r}: {e.strerror or e}; give an address like 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise DashboardError(
                f"port {port} on {host} is in use (another dashboard?): pass --port 0 for any free port, or another"
            ) from None
        raise DashboardError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)  # connections made before the server loop starts wait in the queue instead of being refused
    sock.set_inheritable(True)
    return sock
