"""``noisescale report RUN -o report.html``: one self-contained HTML page (or ``--png`` image) of a run."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from noisescale.cli.args import add_run_argument, open_run_argument

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="write an HTML report (or --png image) of a run",
        description="Write one self-contained HTML file (inline SVG charts, no network needed) with B_simple, its "
        "band and the batch size, the loss, |G|^2 and tr(Sigma), a per-layer heat map and the config. "
        "RUN is a run file, or a run id or name inside --dir.",
    )
    add_run_argument(p)
    p.add_argument("-o", "--output", default=None, help="file to write (default: report.html, or report.png)")
    p.add_argument("--png", action="store_true", help="write a static PNG image instead (needs matplotlib)")
    p.add_argument(
        "--x",
        choices=("examples", "steps", "time"),  # noisescale.report.xaxis.X_AXES, not imported for --help
        default="examples",
        help="x axis of the charts: examples seen (default), optimizer steps, or wall time; the HTML page can "
        "switch between them",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.cli.exits import fail
    from noisescale.report import render_html, render_png

    out = Path(args.output or ("report.png" if args.png else "report.html"))
    with open_run_argument(args) as reader:
        run_file = reader.path.resolve()
        target = out.resolve()
        if target in (run_file, Path(f"{run_file}-wal"), Path(f"{run_file}-shm")):
            return fail(f"refusing to write the report over the run file itself ({str(out)!r}); pass -o report.html")
        if out.is_dir():
            return fail(f"{str(out)!r} is a folder; pass a file name, e.g. -o {out / 'report.html'}")
        if args.png:
            _write_atomic(out, lambda p: render_png(reader, p, x=args.x))
        else:
            page = render_html(reader, x=args.x)
            _write_atomic(out, lambda p: Path(p).write_text(page, encoding="utf-8"))
    print(out)
    return 0


def _write_atomic(out: Path, write: Any) -> None:
    """Write to a new temporary file beside ``out``, then rename: a failure never leaves half a report."""
    from noisescale.store import StoreError

    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb"):  # created with the usual permissions (umask), never over an existing file
            pass
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise StoreError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
