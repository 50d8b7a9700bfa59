"""``noisescale plan RUN``: steps, examples and time of other batch schedules; the critical batch over training."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from noisescale.cli.args import positive_float, positive_int
from noisescale.cli.exits import EXIT_USAGE
from noisescale.cli.format import dumps_json, fmt_duration, fmt_num, table

__all__ = ["register", "run", "text_plan"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "plan",
        help="what other batch schedules would cost (steps, examples, time); the critical batch over training",
        description="Read a run's B_simple and training loss through the model of McCandlish et al. (2018): each "
        "stretch of training needs dS_min steps and dE_min examples, and a batch B takes dS_min (1 + B_noise/B) "
        "steps over it, with B_noise approximated by the measured B_simple.  Recovers dS_min and dE_min from the "
        "batch the run used and predicts other schedules to the same loss: a sweep of fixed batches, a linear "
        "ramp, k x B_simple, devices x micro-batch.  RUN is a run file, or a run id or name inside --dir.",
    )
    p.add_argument("run", metavar="RUN", help="run file path, run id, or run name")
    p.add_argument("--dir", default="runs", help="folder to look RUN up in (default: ./runs)")
    p.add_argument("--target-loss", type=float, default=None, metavar="L", help="plan to this smoothed training loss")
    p.add_argument(
        "--batches",
        type=_batches,
        default="auto",
        metavar="B,B,...",
        help="fixed batch sizes to price (default: powers of two around the run's batch and B_simple; 'none' for none)",
    )
    p.add_argument(
        "--ramp",
        type=_ramp,
        default="auto",
        metavar="START:END[:EXAMPLES]",
        help="a linear batch ramp over the "
        "examples seen (default: from the first stretch's B_simple to the last one's, over the run's examples; "
        "'none' for none)",
    )
    p.add_argument(
        "--follow", type=_floats, default=(1.0,), metavar="K,K,...", help="price k x B_simple for each k (default 1)"
    )
    p.add_argument("--min-batch", type=positive_float, default=1.0, help="lower bound of k x B_simple (default 1)")
    p.add_argument("--max-batch", type=positive_float, default=None, help="upper bound of k x B_simple")
    p.add_argument("--devices", type=positive_int, default=None, metavar="N", help="data-parallel devices")
    p.add_argument(
        "--micro-batch",
        type=positive_int,
        default=None,
        metavar="M",
        help="examples per device and pass (with "
        "--devices: prices N x M, and splits every schedule's steps over the devices for its time)",
    )
    p.add_argument("--accumulation", type=positive_int, default=1, metavar="A", help="passes per step for N x M x A")
    p.add_argument(
        "--step-time",
        type=_step_time,
        action="append",
        default=None,
        metavar="SIZE:SECONDS",
        help="a measured "
        "time of one pass of SIZE examples on one device; give two (or more) to fit t(b) = t0 + t1*b and predict "
        "times",
    )
    p.add_argument("--stretches", type=positive_int, default=10, help="stretches to cut the run into (default 10)")
    p.add_argument(
        "--loss-window",
        type=positive_float,
        default=None,
        metavar="EXAMPLES",
        help="examples over which the loss is smoothed (default: 2%% of the run, at least 10 steps)",
    )
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--png", default=None, metavar="FILE", help="also draw steps against examples to FILE (matplotlib)")
    p.set_defaults(handler=run)


def _split(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _batches(text: str) -> list[float] | str:
    if text in ("auto", "none"):
        return text
    return _split(text, "comma-separated positive batch sizes, e.g. 32,64,128 (or auto, none)")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(_split(text, "comma-separated positive numbers, e.g. 0.5,1,2"))


def _ramp(text: str) -> Any:
    if text in ("auto", "none"):
        return text
    parts = text.split(":")
    bad = argparse.ArgumentTypeError(f"expected START:END or START:END:EXAMPLES (positive numbers), got {text!r}")
    if len(parts) not in (2, 3):
        raise bad
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise bad from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise bad
    return tuple(values)


def _step_time(text: str) -> tuple[float, float]:
    bad = argparse.ArgumentTypeError(f"expected SIZE:SECONDS, e.g. 32:0.012, got {text!r}")
    parts = text.split(":")
    if len(parts) != 2:
        raise bad
    try:
        size, seconds = float(parts[0]), float(parts[1])
    except ValueError:
        raise bad from None
    if not (math.isfinite(size) and size > 0 and math.isfinite(seconds) and seconds > 0):
        raise bad
    return size, seconds


def _usage(message: str) -> int:
    print(f"noisescale plan: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    from noisescale.planning import Devices, LinearRamp, StepTime, analyse, default_schedules, price
    from noisescale.store import open_run

    if args.micro_batch is not None and args.devices is None:
        return _usage("--micro-batch needs --devices (the number of devices sharing each step)")
    if args.devices is not None and args.micro_batch is None:
        return _usage("--devices needs --micro-batch (the examples each device takes per pass)")
    if args.step_time is not None and len(args.step_time) < 2:
        return _usage(
            "--step-time needs two measurements at different sizes, e.g. --step-time 32:0.012 --step-time 256:0.040"
        )
    if args.max_batch is not None and args.max_batch < args.min_batch:
        return _usage(f"--max-batch must be >= --min-batch, got {args.max_batch:g} < {args.min_batch:g}")
    if args.png:
        from noisescale.planning.png import pyplot

        pyplot()  # fail before reading the run if matplotlib is missing
    step_time = (
        StepTime.fit(args.step_time, devices=args.devices or 1, micro_batch=args.micro_batch)
        if args.step_time
        else None
    )
    with open_run(args.run, dir=args.dir) as reader:
        analysis = analyse(reader, target_loss=args.target_loss, stretches=args.stretches, loss_window=args.loss_window)
    ramp: Any = args.ramp
    if isinstance(ramp, tuple):
        ramp = LinearRamp(ramp[0], ramp[1], ramp[2] if len(ramp) == 3 else float(analysis.examples))
    elif ramp == "none":
        ramp = None
    schedules = default_schedules(
        analysis,
        batches=[] if args.batches == "none" else args.batches,
        ramp=ramp,
        follow=args.follow,
        min_batch=args.min_batch,
        max_batch=args.max_batch,
    )
    if args.devices is not None:
        schedules.append(Devices(args.devices, args.micro_batch, accumulation=args.accumulation))
    result = price(analysis, schedules, step_time=step_time)
    if args.png:
        from noisescale.cli.report import _write_atomic
        from noisescale.planning.png import render_plan_png

        _write_atomic(Path(args.png), lambda p: render_plan_png(result, p))
    if args.json:
        sys.stdout.write(dumps_json(result.to_dict()) + "\n")
    else:
        print(text_plan(result))
    if args.png:
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def _range(v: float, r: tuple[float, float], digits: int = 0) -> str:
    lo, hi = r
    if abs(hi - lo) <= 1e-9 * max(abs(v), 1.0):
        return fmt_num(round(v), digits)
    return f"{fmt_num(round(v))} [{fmt_num(round(lo))}-{fmt_num(round(hi))}]"


def _batch(lo: float, hi: float) -> str:
    if not math.isfinite(lo):
        return "-"
    if abs(hi - lo) < 1e-9 * max(hi, 1.0):
        return f"{lo:,.0f}" if lo >= 10 else f"{lo:.3g}"
    return f"{lo:,.0f}-{hi:,.0f}" if lo >= 10 else f"{lo:.3g}-{hi:,.0f}"


def text_plan(p: Any) -> str:
    """The plan as a terminal table: the run, the model's totals, each schedule, the critical batch, caveats."""
    to = (
        f"to training loss {p.target_loss:g} (smoothed over {p.loss_window:,.0f} examples, at step {p.steps:,})"
        if p.target_loss is not None
        else "to its end"
    )
    best = p.best_steps(p.examples)
    lines = [
        f"run       {p.run['name']}  ({p.run['id']})",
        f"took      {p.steps:,} steps, {p.examples:,} examples, batch {_batch(p.batch_min, p.batch_max)}, {to}"
        + (f"; {fmt_duration(p.wall_s)} wall" if p.wall_s else ""),
        f"model     S_min {_range(p.min_steps, p.min_steps_range)} steps, E_min "
        f"{_range(p.min_examples, p.min_examples_range)} examples; critical batch E_min/S_min "
        f"{fmt_num(p.critical_batch)}",
        f"          (McCandlish et al. 2018 with B_noise ~ B_simple; [ranges]: B_noise anywhere in the bands of the "
        f"{len(p.stretches)} stretches)",
        f"best      {fmt_num(None if best is None else round(best))} steps with this run's examples, at a batch "
        "proportional to sqrt(B_simple): the model's optimum",
        "          (every fixed batch and every unclipped k x B_simple lie on one steps/examples curve, above it)",
        "",
    ]
    rows = []
    for q in p.predictions:
        rows.append(
            [
                q.name + (" (!)" if q.extrapolated else ""),
                _batch(q.batch_min, q.batch_max),
                _range(q.steps, q.steps_range),
                _range(q.examples, q.examples_range),
                "-" if q.time_s is None else f"{fmt_duration(q.time_s)}",
                f"{q.steps_ratio:.2f}x",
                f"{q.examples_ratio:.2f}x",
            ]
        )
    lines.append(
        table(
            ["schedule", "batch", "steps", "examples", "time", "steps/run", "examples/run"],
            rows,
            right=[False, True, True, True, True, True, True],
        )
    )
    if p.step_time is None:
        lines.append("time: pass --step-time SIZE:SECONDS twice (two measured pass times) to predict it")
    else:
        st = p.step_time
        lines.append(
            f"time: t(b) = {st.t0:.4g} s + {st.t1:.4g} s x b per pass, {st.devices} device(s)"
            + (f", micro-batch {st.micro_batch}" if st.micro_batch else "")
        )
    if any(q.extrapolated for q in p.predictions):
        lines.append("(!): batch sizes far beyond the run's own: an extrapolation")

    start = p.stretches[0].examples_start
    total = max(p.examples - start, 1)
    crit = []
    for s in p.stretches:
        band = f"[{fmt_num(s.b_simple_low)}, {fmt_num(s.b_simple_high)}]"
        crit.append(
            [
                str(s.index + 1),
                f"{100 * (s.examples_end - start) / total:.0f}%",
                f"{s.examples_end:,}",
                "-" if s.loss is None else f"{s.loss:.4g}",
                fmt_num(s.b_simple) + (" *" if s.filled else ""),
                band,
                _batch(s.batch, s.batch),
                "-" if not s.b_simple else f"{s.batch / s.b_simple:.2g}",
            ]
        )
    lines += [
        "",
        "critical batch over training (B_crit ~ B_simple of each stretch: mean raw tr(Sigma) / mean raw |G|^2)",
        table(
            ["stretch", "up to", "examples", "loss", "B_simple", "band", "batch", "batch/B_simple"],
            crit,
            right=[True, True, True, True, True, False, True, True],
        ),
    ]
    if any(s.filled for s in p.stretches):
        lines.append("*: undefined there; taken from the neighbouring stretches")
    if p.by_loss:
        levels = ", ".join(f"{r['loss']:.3g} -> {fmt_num(r['b_simple'])}" for r in p.by_loss)
        lines.append(f"by loss level (first reached): {levels}")
    if p.warnings:
        lines += ["", "warnings (where the model is weak for this run)"]
        lines += [f"  * {w.message}" for w in p.warnings]
    lines += ["", "assumptions"]
    lines += [f"  * {a}" for a in p.assumptions]
    return "\n".join(lines)
