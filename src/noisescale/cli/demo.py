"""``noisescale demo``: train a small model on embedded data with the monitor on, and explain what it saw."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from noisescale.cli.args import add_dir_argument, positive_float, positive_int

__all__ = ["register", "run"]

T = TypeVar("T")

DESCRIPTION = """\
Train a small model on data that ships with Python (no download) with the noise-scale monitor on, record the
run in DIR, and explain what B_simple did.  Default task: an MLP on scikit-learn's digits (needs the `demo`
extra: pip install 'noisescale[demo]'); --task charlm: a tiny byte-level transformer on Python's own
standard-library sources (needs nothing extra)."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="train a small model with live B_simple and record a run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", choices=("digits", "charlm"), default="digits", help="what to train (default: digits)")
    add_dir_argument(p, positional=False, help="folder for the run file")
    p.add_argument("--name", default=None, help="run name (default: the task name)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: 800 digits, 300 charlm)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--source",
        choices=("auto", "example", "microbatch"),
        default="auto",
        help="where the small batches come from: per-example norms, micro-batches, or auto (default)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="examples per step (default: 128 digits, 32 charlm)"
    )
    p.add_argument(
        "--micro-batches",
        type=positive_int,
        default=None,
        help="split each step into this many backward passes (default: 4 with --source microbatch, else 1)",
    )
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--halflife", type=positive_float, default=None, help="smoothing half-life in examples")
    p.add_argument(
        "--compare-sources",
        action="store_true",
        help="also measure with 4 micro-batches on the same steps and check that both sources agree (exit 1 if not)",
    )
    p.add_argument(
        "--noisy-labels",
        type=positive_float,
        default=None,
        metavar="FRACTION",
        help="digits: flip this fraction of the training labels and show that their examples' gradients stand out",
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="digits with a fixed batch and with the batch-size controller, side by side (same examples)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or explanation; print the run file only")
    p.add_argument(
        "--dashboard", action="store_true", help="serve the live dashboard over --dir while training (dashboard extra)"
    )
    p.add_argument("--dashboard-port", type=int, default=8765, help="its port (default: 8765, else any free one)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.cli.exits import fail
    from noisescale.demo import DemoError, DemoOptions, run_demo
    from noisescale.demo.explain import explain, sources_agree

    if args.adaptive:
        return _adaptive(args)
    if args.source == "microbatch" and args.micro_batches == 1:
        print("noisescale demo: error: --source microbatch needs --micro-batches 2 or more", file=sys.stderr)
        return 2
    options = DemoOptions(
        task=args.task,
        dir=args.dir,
        name=args.name,
        steps=args.steps,
        seed=args.seed,
        source=args.source,
        batch_size=args.batch_size,
        micro_batches=args.micro_batches,
        lr=args.lr,
        halflife=args.halflife,
        compare_sources=args.compare_sources,
        progress=not args.quiet,
        noisy_labels=args.noisy_labels,
    )
    try:
        result, server = _beside_dashboard(args, lambda: run_demo(options))
    except DemoError as e:
        return fail(str(e))
    if args.quiet:
        print(result.path)
    else:
        print(explain(result))
    if args.noisy_labels and not args.quiet and result.data is not None:
        from noisescale.demo.noisy import noisy_report

        print("\n" + noisy_report(result.data))
    if server is not None:
        server.linger()  # serves on until Ctrl+C when a person is at the terminal
    if args.compare_sources and not sources_agree(result):
        return fail("--compare-sources: the per-example and micro-batch sources disagree (see the table above)")
    return 0


def _adaptive(args: argparse.Namespace) -> int:
    from noisescale.cli.exits import fail
    from noisescale.demo import DemoError
    from noisescale.demo.adaptive import AdaptiveOptions, adaptive_table, run_adaptive_demo

    if (
        args.task != "digits"
        or args.compare_sources
        or args.source != "auto"
        or args.micro_batches
        or args.noisy_labels
    ):
        return fail(
            "--adaptive trains the digits task with the example source; drop --task, --source, "
            "--micro-batches, --compare-sources and --noisy-labels"
        )
    batch = args.batch_size or 32
    options = AdaptiveOptions(
        dir=args.dir,
        name=args.name,
        seed=args.seed,
        batch_size=batch,
        examples=(args.steps or 1600) * batch,
        lr=args.lr,
        halflife=args.halflife,
        progress=not args.quiet,
    )
    try:
        result, server = _beside_dashboard(args, lambda: run_adaptive_demo(options))
    except DemoError as e:
        return fail(str(e))
    print(f"{result.fixed.path}\n{result.adaptive.path}" if args.quiet else adaptive_table(result))
    if server is not None:
        server.linger()  # serves on until Ctrl+C when a person is at the terminal
    return 0


def _beside_dashboard(args: argparse.Namespace, train: Callable[[], T]) -> tuple[T, Any]:
    """``train()``, with ``--dashboard`` serving ``--dir`` beside it; returns its result and the server (or
    ``None``), which is stopped if the training raises."""
    if not args.dashboard:
        return train(), None
    from noisescale.dashboard.beside import start_beside

    server = start_beside(args.dir, port=args.dashboard_port)
    try:
        return train(), server
    except BaseException:
        server.close()
        raise
