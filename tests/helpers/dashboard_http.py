"""HTTP for the dashboard tests: raw requests (the path is sent exactly as written, never normalised, so traversal
attempts reach the server as an attacker would send them), server-sent events, and checks against the OpenAPI
document."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from noisescale.dashboard.openapi import openapi_document

ROUTES = {  # path template -> OpenAPI path
    "/api/runs": "/api/runs",
    "/api/runs/{run}": "/api/runs/{run}",
    "/api/runs/{run}/series": "/api/runs/{run}/series",
    "/api/runs/{run}/layers": "/api/runs/{run}/layers",
    "/api/runs/{run}/events": "/api/runs/{run}/events",
    "/api/runs/{run}/updates": "/api/runs/{run}/updates",
    "/api/compare": "/api/compare",
    "/api/openapi.json": "/api/openapi.json",
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, target: str, *, headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> Answer:
    """GET ``target`` (path and query, sent verbatim) from 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{host}:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def url(path: str, params: dict[str, Any] | None = None) -> str:
    return path + ("?" + urllib.parse.urlencode(params) if params else "")


class OpenApi:
    """Checks requests and answers against the dashboard's own OpenAPI document (openapi-core)."""

    def __init__(self) -> None:
        from openapi_core import OpenAPI

        self.document = openapi_document("test")
        self.spec = OpenAPI.from_dict(self.document)  # also validates the document itself

    def check(self, port: int, path: str, params: dict[str, Any] | None = None, *, run: str | None = None) -> Answer:
        """GET ``path`` with ``params`` and validate the answer (and, for a 200, the request) against the document."""
        from openapi_core.testing import MockRequest, MockResponse

        answer = request(port, url(path, params))
        req = MockRequest(
            f"http://127.0.0.1:{port}",
            "get",
            path,
            args={k: str(v) for k, v in (params or {}).items()},
            view_args={"run": run} if run is not None else None,
        )
        with warnings.catch_warnings():
            # `allowEmptyValue` (for `?metrics=`) is valid OpenAPI 3.1, only discouraged; openapi-core says so.
            warnings.filterwarnings("ignore", "Use of allowEmptyValue", DeprecationWarning)
            if answer.status == 200:
                self.spec.validate_request(req)
            self.spec.validate_response(
                req, MockResponse(answer.body, status_code=answer.status, content_type=answer.headers["content-type"])
            )
        return answer

    def validate_schema(self, instance: Any, name: str) -> None:
        """Validate ``instance`` against ``components/schemas/<name>`` (for server-sent event payloads)."""
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        registry = Registry().with_resource("urn:dashboard", resource)
        Draft202012Validator({"$ref": f"urn:dashboard#/components/schemas/{name}"}, registry=registry).validate(
            instance
        )


def sse_events(port: int, target: str, *, timeout: float = 30.0) -> Iterator[tuple[str, Any]]:
    """The ``(event, data)`` pairs of a server-sent event stream, until it ends or ``timeout`` seconds pass."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    end = time.monotonic() + timeout
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        event, data = "message", []
        while time.monotonic() < end:
            line = resp.readline()
            if not line:
                return
            text = line.decode().rstrip("\n")
            if text == "":
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif text.startswith(":"):
                continue
            else:
                field, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
    finally:
        conn.close()
