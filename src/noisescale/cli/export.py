"""``noisescale export RUN --to tensorboard|csv``: a run store as TensorBoard event files or CSV files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from noisescale.cli.args import add_run_argument, open_run_argument
from noisescale.cli.exits import EXIT_OK, fail

__all__ = ["register", "run"]

FORMATS = ("tensorboard", "csv")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="convert a run to TensorBoard event files or CSV files",
        description="Write every measurement (whole model, each parameter tensor and each module, every column), "
        "logged metric and event of RUN into a new folder: TensorBoard event files (the same tags and layout as "
        "noisescale.sinks.TensorBoard) or CSV files (as noisescale.sinks.CSV).  RUN is a run file, or a run id or "
        "name inside --dir.  A run still training is exported as far as it is written.",
    )
    add_run_argument(p)
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument(
        "-o",
        "--out",
        metavar="OUT",
        default=None,
        help="folder to create (must be new or empty; default: ./<run file name>-<format>)",
    )
    p.add_argument(
        "--x",
        choices=("step", "examples"),
        default="step",
        help="TensorBoard's x axis: optimizer steps (default) or examples seen",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.sinks.replay import replay
    from noisescale.types import COLUMNS

    with open_run_argument(args) as reader:
        out = Path(args.out) if args.out is not None else Path(f"{reader.path.stem}-{args.to}")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            return fail(f"{str(out)!r} already exists and is not an empty folder: choose a new --out")
        try:
            if args.to == "tensorboard":
                from noisescale.sinks.tensorboard import TensorBoard

                sink: Any = TensorBoard(out, x=args.x, layers="both", layer_columns=COLUMNS)
            else:
                from noisescale.sinks.csv_files import CSV

                sink = CSV(out)
        except ImportError as e:
            return fail(str(e))
        try:
            counts = replay(reader, sink)
        finally:
            sink.close()
        status = reader.info.status
    note = " (the run is still being written: exported as far as it was)" if status == "running" else ""
    print(
        f"exported {counts['measurements']} measurements, {counts['metrics']} metric values and {counts['events']} "
        f"events to {out}{note}"
    )
    if args.to == "tensorboard":
        print(f"view them with: tensorboard --logdir {out}")
    return EXIT_OK
