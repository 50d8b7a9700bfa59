"""``WebhookChannel``: POST each alert as JSON to a URL, from its own thread, never holding training up.

``notify`` only puts the alert on a bounded queue (dropping it, counted, when the queue is full), so neither the
training step nor the monitor's sink thread ever waits on the network.  A background thread sends each alert
with a timeout, retrying connection errors, timeouts, HTTP 429 and 5xx answers with exponential backoff; other
4xx answers are the request's fault and are not retried.  Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from typing import Any

from noisescale.alerts.channels import Alert
from noisescale.errors import ConfigError

__all__ = ["WebhookChannel"]

_STOP = object()


class WebhookChannel:
    """Sends every alert as an HTTP POST of JSON (``Alert.to_dict()`` plus ``"text"``) to ``url``.

    Args:
        url: an ``http://`` or ``https://`` address (Slack-style incoming webhooks, a bot, your own service).
        timeout: seconds to wait for one answer.
        retries: further attempts after a failed one (connection error, timeout, HTTP 429 or 5xx).
        backoff: seconds before the first retry; doubled for each next one, up to ``max_backoff``.
        max_backoff: the longest wait between two attempts.
        queue_size: alerts waiting to be sent at most; more are dropped and counted (``dropped``).
        headers: extra HTTP headers (e.g. an authorisation token).
        close_timeout: at ``close()``, seconds given to the alerts still queued before they are abandoned.

    Counters (read them after ``close()``): ``delivered``, ``failed`` (gave up after the retries), ``dropped``
    (queue full, or abandoned at close), ``attempts`` (every POST tried).

    Raises:
        ConfigError: a URL that is not http(s), or a bad number.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        queue_size: int = 100,
        headers: Mapping[str, str] | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"url must be an http:// or https:// address, got {url!r}")
        for what, v in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{what} must be a non-negative number of seconds, got {v!r}")
        if timeout == 0:
            raise ConfigError("timeout must be positive: a POST with no time to answer always fails")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be a non-negative int, got {retries!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"queue_size must be a positive int, got {queue_size!r}")
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.headers = {"Content-Type": "application/json", "User-Agent": "noisescale-alerts", **dict(headers or {})}
        self.close_timeout = float(close_timeout)
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.attempts = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._abort = threading.Event()  # set when close() gives up: stop waiting, drop the rest
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._warned = False

    def notify(self, alert: Alert) -> None:
        """Queue ``alert`` for sending; never waits (a full queue drops it)."""
        if self._closed:
            return
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def close(self) -> None:
        """Send what is queued, for at most ``close_timeout`` seconds, then stop.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is None:
            return
        deadline = time.monotonic() + self.close_timeout
        while True:  # the stop marker must get in even if the queue is full
            try:
                self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abort.set()  # the thread drops what is left; it is a daemon, so exit never waits on it
            self._thread.join(self.timeout + 1.0)
        if self.dropped:
            warnings.warn(
                f"noisescale: {self.dropped} alert(s) were not delivered to the webhook {self.url}: the queue was full "
                f"(queue_size={self._queue.maxsize}) or they were still waiting after close_timeout="
                f"{self.close_timeout:g} s",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- sender thread ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="noisescale-webhook", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._abort.is_set():
                with self._lock:
                    self.dropped += 1
                continue
            self._send(item)

    def _send(self, alert: Alert) -> None:
        body = json.dumps({**alert.to_dict(), "text": alert.text()}, default=str).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                if self._abort.wait(delay):
                    with self._lock:
                        self.dropped += 1
                    return
            with self._lock:
                self.attempts += 1
            retry, last = self._post(body)
            if last == "":
                with self._lock:
                    self.delivered += 1
                return
            if not retry:
                break
        with self._lock:
            self.failed += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"noisescale: could not deliver an alert to the webhook {self.url}: {last}; further failures are "
                "counted silently (WebhookChannel.failed)",
                RuntimeWarning,
                stacklevel=1,
            )

    def _post(self, body: bytes) -> tuple[bool, str]:
        """One POST: ``(retry, "")`` on success, else whether to retry and what went wrong."""
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
            return False, ""
        except urllib.error.HTTPError as e:
            return (e.code == 429 or e.code >= 500), f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            return True, f"{type(e).__name__}: {reason}"

    def __repr__(self) -> str:
        return f"WebhookChannel({self.url!r})"
