"""The dashboard's gate, as plain ASGI middleware: the token, the Host header, and the security headers.

- ``token``: when set, every request (page, static files, API, stream) must carry it, as ``Authorization: Bearer
  T``, ``X-Noisescale-Token: T``, the query parameter ``token=T``, or the cookie the page gets when it is opened
  with ``?token=T`` (so the browser's own requests for scripts carry it too).  Compared in constant time.
- ``allowed_hosts``: when the server listens on a loopback address only, a request whose ``Host`` is another
  name is refused, so a web page cannot reach the dashboard through a name of its own that resolves to 127.0.0.1
  (DNS rebinding).
- Every answer gets a strict Content-Security-Policy (scripts from the dashboard itself only), ``nosniff``,
  no referrer (the token may be in the address) and no framing.
"""

from __future__ import annotations

import hmac
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

__all__ = ["SECURITY_HEADERS", "Guard", "cookie_name"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def cookie_name(port: int | None) -> str:
    """The token cookie's name; it holds the port, since cookies are shared by every port of a host."""
    return f"noisescale-token-{port or 0}"


class Guard:
    """Wrap ``app``: refuse requests without ``token`` (when set) or with a foreign ``Host``; add the headers."""

    def __init__(
        self, app: ASGIApp, *, token: str | None, allowed_hosts: Collection[str] | None, port: int | None = None
    ) -> None:
        self.app = app
        self._token = None if token is None else token.encode()
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.port = port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.allowed_hosts is not None:
            host = _hostname(headers.get("host", ""))
            if host not in self.allowed_hosts:
                await _refuse(
                    send,
                    400,
                    f"unexpected Host header {headers.get('host', '')!r}: this dashboard listens on a loopback "
                    f"address and answers only to {sorted(self.allowed_hosts)}",
                )
                return
        set_cookie: bytes | None = None
        if self._token is not None:
            given, from_query = self._given(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self._token):
                what = "a wrong token" if given is not None else "no token"
                await _refuse(
                    send,
                    401,
                    f"this dashboard needs its token and the request carried {what}: open the address printed by "
                    "`noisescale dashboard` (it ends in ?token=...), or send the header 'Authorization: Bearer T'",
                    extra=((b"www-authenticate", b'Bearer realm="noisescale"'),),
                )
                return
            if from_query:
                name = cookie_name(self.port or _port(scope))
                value = urllib.parse.quote(given, safe="")
                set_cookie = f"{name}={value}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if set_cookie is not None:
                    extra.append((b"set-cookie", set_cookie))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _given(self, scope: Scope, headers: dict[str, str]) -> tuple[str | None, bool]:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if "x-noisescale-token" in headers:
            return headers["x-noisescale-token"], False
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        values = query.get("token", [])
        if len(values) == 1:
            return values[0], True
        if len(values) > 1:
            return None, False
        cookies = _cookies(headers.get("cookie", ""))
        value = cookies.get(cookie_name(self.port or _port(scope)))
        return (None if value is None else urllib.parse.unquote(value)), False


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        out.setdefault(k.decode("latin-1").lower(), _text(v))
    return out


def _text(value: bytes) -> str:
    # A non-ASCII token arrives as UTF-8 from most clients and as Latin-1 from browsers' fetch(): accept both.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _port(scope: Scope) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


def _cookies(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


async def _refuse(send: Send, status: int, message: str, *, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": message, "status": status, "parameter": None}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *SECURITY_HEADERS,
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
