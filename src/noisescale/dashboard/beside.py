"""The dashboard beside a training in the same process (``noisescale demo --dashboard``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

from noisescale.dashboard.server import DEFAULT_PORT, DashboardError, DashboardServer

__all__ = ["start_beside"]


def start_beside(
    dir: str | os.PathLike[str], *, port: int = DEFAULT_PORT, stream: TextIO | None = None
) -> DashboardServer:
    """Serve the dashboard over ``dir`` (created if missing) from a background thread on 127.0.0.1, and print its
    address.  ``port`` taken: any free port instead.

    Raises:
        MissingDependencyError: the dashboard extra is not installed (before anything is trained).
    """
    out = sys.stderr if stream is None else stream
    Path(dir).mkdir(parents=True, exist_ok=True)
    try:
        server = DashboardServer(dir, port=port)
    except DashboardError:
        if port == 0:
            raise
        server = DashboardServer(dir, port=0)  # the usual port is taken (another dashboard?): any free one
    server.start()
    print(f"noisescale: live dashboard at {server.url} (the run appears there within seconds)", file=out, flush=True)
    return server
