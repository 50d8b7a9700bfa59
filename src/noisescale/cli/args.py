"""Arguments shared by the subcommands: how a run is named (``RUN``, ``--dir``), ``--json``, and number types
(argparse turns their ``ArgumentTypeError`` into exit code 2).

Nothing here imports the run store or torch: building the parser must stay cheap (``noisescale --help``).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from noisescale.store import RunReader

__all__ = [
    "DEFAULT_DIR",
    "add_dir_argument",
    "add_json_argument",
    "add_run_argument",
    "open_run_argument",
    "positive_float",
    "positive_int",
]

DEFAULT_DIR = "runs"
"""The folder of run files every command uses by default (``noisescale.store.DEFAULT_DIR``, not imported here)."""


def add_run_argument(p: argparse.ArgumentParser) -> None:
    """``RUN`` (a run file, or a run id or name inside ``--dir``) and ``--dir``; read them with
    ``open_run_argument``."""
    p.add_argument("run", metavar="RUN", help="run file path, run id, or run name")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"folder to look RUN up in (default: ./{DEFAULT_DIR})")


def open_run_argument(args: argparse.Namespace) -> RunReader:
    """The run named by ``add_run_argument``'s arguments, open for reading (``StoreError`` if there is none)."""
    from noisescale.store import open_run

    return open_run(args.run, dir=args.dir)


def add_dir_argument(p: argparse.ArgumentParser, *, positional: bool, help: str) -> None:
    """A folder of run files: ``DIR`` (optional positional) or ``--dir``, defaulting to ``./runs``."""
    text = f"{help} (default: ./{DEFAULT_DIR})"
    if positional:
        p.add_argument("dir", metavar="DIR", nargs="?", default=DEFAULT_DIR, help=text)
    else:
        p.add_argument("--dir", default=DEFAULT_DIR, help=text)


def add_json_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--json", action="store_true", help=help)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
