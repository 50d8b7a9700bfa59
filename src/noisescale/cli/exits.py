"""Exit codes scripts can rely on, and the one-line error every subcommand prints."""

from __future__ import annotations

import sys

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_USAGE", "fail"]

EXIT_OK = 0
EXIT_BAD_INPUT = 1  # a missing or unreadable file, an unknown run, a failed check
EXIT_USAGE = 2  # what argparse uses for a bad command line


def fail(message: str) -> int:
    """Print ``noisescale: error: <message>`` (one line) to stderr; returns ``EXIT_BAD_INPUT``."""
    print(f"noisescale: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT
