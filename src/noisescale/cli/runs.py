"""``noisescale runs DIR``: list the runs in a folder with their key numbers (``--json`` for machines)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from noisescale.cli.args import add_dir_argument, add_json_argument
from noisescale.cli.format import dumps_json, fmt_duration, fmt_num, table

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "runs",
        help="list the runs in a folder",
        description="List the runs in DIR, oldest first: status, steps, examples, batch size, B_simple (last "
        "value, first and last fifth) and the loss.  Unreadable files are reported on stderr and make the exit "
        "code 1; nothing is modified.",
    )
    add_dir_argument(p, positional=True, help="folder of run files")
    add_json_argument(p, "print the runs' summaries as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.store import RunReader, StoreError, run_files, summarize

    summaries = []
    problems = []
    for path in run_files(args.dir):
        try:
            with RunReader(path) as reader:
                summaries.append(summarize(reader))
        except StoreError as e:
            problems.append(str(e))
    if args.json:
        sys.stdout.write(dumps_json(summaries) + "\n")
    elif summaries:
        rows = []
        for s in summaries:
            b, loss = s["b_simple"], s["loss"]
            rows.append(
                [
                    s["name"],
                    s["id"],
                    s["status"],
                    f"{s['steps']:,}",
                    f"{s['examples']:,}",
                    fmt_num(s["batch_size"]),
                    fmt_num(b["last"]),
                    f"{fmt_num(b['first_fifth'])} -> {fmt_num(b['last_fifth'])}",
                    "-" if not loss else f"{loss['last']:.4g}",
                    fmt_duration(s["duration_s"]),
                ]
            )
        header = ["name", "id", "status", "steps", "examples", "batch", "B_simple", "first->last fifth", "loss", "time"]
        print(table(header, rows, right=[False, False, False, True, True, True, True, False, True, True]))
    else:
        print(f"no runs in {args.dir!r} yet: `noisescale demo --dir {args.dir}` writes one", file=sys.stderr)
    for msg in problems:
        print(f"noisescale: skipped: {msg}", file=sys.stderr)
    return 1 if problems else 0
