"""``noisescale dashboard DIR``: a local web page over the run files in DIR, live while they are written."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["TOKEN_ENV", "register", "run"]

TOKEN_ENV = "NOISESCALE_DASHBOARD_TOKEN"

DESCRIPTION = f"""\
Serve a web page showing the runs in DIR: B_simple with its band beside the batch size and the learning rate,
the loss and your metrics, |G|^2 and tr(Sigma), a per-layer heat map, alerts and controller decisions, several
runs overlaid.  It reads the run files read-only and updates live while training writes them.  Every view has a
JSON twin under /api (described at /api/openapi.json).

Listens on 127.0.0.1 (this machine only) unless --host says otherwise.  --token (or ${TOKEN_ENV}) makes every
request carry a token; the printed address includes it.  Needs the dashboard extra:
pip install 'noisescale[dashboard]'."""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535 (0: any free port), got {text!r}")
    return value


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "dashboard",
        help="serve a live web dashboard of the runs in a folder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="folder of run files (default: ./runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8765, help="port (default: 8765; 0: any free port)")
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require this token on every request (default: ${TOKEN_ENV}, else none)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.dashboard.server import DashboardServer, is_loopback

    if not is_loopback(args.host):
        print(
            f"noisescale dashboard: warning: listening on {args.host}, not on 127.0.0.1: anyone who can reach this "
            "machine on that port can read every run in the folder"
            + ("" if args.token else " (add --token to require a token)"),
            file=sys.stderr,
        )
    server = DashboardServer(args.dir, host=args.host, port=args.port, token=args.token or None)
    print(f"noisescale dashboard: serving the runs in {args.dir} at {server.url}  (Ctrl+C to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl+C, then passes the signal on
        pass
    print("noisescale dashboard: stopped", file=sys.stderr)
    return 0
