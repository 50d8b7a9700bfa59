"""``noisescale``: the command line.  Exit codes: 0 ok, 1 bad input (a file, a run, a failed check), 2 usage.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser and sets
``handler(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import noisescale.cli.dashboard as dashboard_cmd
import noisescale.cli.demo as demo_cmd
import noisescale.cli.export as export_cmd
import noisescale.cli.plan as plan_cmd
import noisescale.cli.report as report_cmd
import noisescale.cli.runs as runs_cmd
import noisescale.cli.show as show_cmd
from noisescale.cli.exits import EXIT_OK, EXIT_USAGE, fail
from noisescale.errors import NoiseScaleError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from noisescale.version import __version__

    parser = argparse.ArgumentParser(
        prog="noisescale",
        description="The gradient noise scale (B_simple) of your training runs: record, inspect, report.",
        epilog="Start with `noisescale demo`, then `noisescale show RUN` and `noisescale report RUN -o report.html`.",
    )
    parser.add_argument("--version", action="version", version=f"noisescale {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for module in (demo_cmd, show_cmd, report_cmd, runs_cmd, export_cmd, plan_cmd, dashboard_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(handler(args))
    except NoiseScaleError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("noisescale: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `noisescale runs | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
