"""``noisescale show RUN``: a run's summary in the terminal, or everything as JSON (``--json``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from noisescale.cli.args import add_json_argument, add_run_argument, open_run_argument
from noisescale.cli.format import dumps_json, fmt_duration, fmt_num, fmt_time, table

__all__ = ["register", "run", "text_summary"]

STALE_AFTER_S = 120.0
MAX_LAYER_ROWS = 30


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "show",
        help="summarise one run (--json for machines)",
        description="Summarise one run: progress, B_simple now and how it moved, the loss, per-layer values. "
        "RUN is a run file, or a run id or name inside --dir (a name used twice means the latest run). "
        "Safe on a run that is still training: the file is opened read-only.",
    )
    add_run_argument(p)
    add_json_argument(p, "print the summary and every series as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.store import summarize

    with open_run_argument(args) as reader, reader.snapshot():
        summary = summarize(reader)
        if args.json:
            doc = {
                "summary": summary,
                "series": _series(reader),
                "metrics": {k: _metric(reader, k) for k in reader.metric_names()},
                "layers": _last_layers(reader),
                "events": reader.events(),
            }
            sys.stdout.write(dumps_json(doc) + "\n")
            return 0
        layers = _last_layers(reader)
    print(text_summary(summary, layers))
    return 0


def _series(reader: Any) -> dict[str, list[Any]]:
    rows = reader.measurements()
    keys = rows[0].keys() if rows else ("step", "examples", "wall_time")
    return {k: [r[k] for r in rows] for k in keys}


def _metric(reader: Any, key: str) -> dict[str, list[Any]]:
    s = reader.metric(key)
    return {"step": s.step, "examples": s.examples, "wall_time": s.wall_time, "value": s.value}


def _last_layers(reader: Any) -> dict[str, dict[str, Any]]:
    return dict(reader.latest_layers("param"))


def text_summary(s: dict[str, Any], layers: dict[str, dict[str, Any]]) -> str:
    b = s["b_simple"]
    status = s["status"]
    if status == "running" and time.time() - s["updated_at"] > STALE_AFTER_S:
        status += f" (no write since {fmt_time(s['updated_at'])}: the process may have stopped)"
    lines = [
        f"run       {s['name']}  ({s['id']})",
        f"file      {s['path']}",
        f"status    {status}; started {fmt_time(s['started_at'])}, {fmt_duration(s['duration_s'])}",
        f"progress  {s['steps']:,} steps, {s['examples']:,} examples, batch size {fmt_num(s['batch_size'])}, "
        f"source {s['source'] or '-'}"
        + (f" (coverage {100 * s['coverage']:.0f}%)" if s["coverage"] is not None else ""),
        f"B_simple  {fmt_num(b['last'])} [{fmt_num(b['low'])}, {fmt_num(b['high'])}] at the last step; "
        f"first fifth {fmt_num(b['first_fifth'])} -> last fifth {fmt_num(b['last_fifth'])}"
        + (f" (x{b['growth']:.1f})" if b["growth"] else ""),
    ]
    if s["loss"]:
        lo = s["loss"]
        lines.append(f"loss      {lo['first']:.4g} -> {lo['last']:.4g} (min {lo['min']:.4g})")
    if s["skipped_steps"]:
        lines.append(f"skipped   {s['skipped_steps']} step(s) with non-finite gradients")
    lines.append(f"metrics   {', '.join(s['metrics']) or '-'}")
    lines.append(f"events    {s['events']}")
    if s["config"]:
        cfg = " ".join(f"{k}={v}" for k, v in sorted(s["config"].items()))
        lines.append(f"config    {cfg}")
    if layers:
        rows = [
            [
                name,
                fmt_num(v["b_simple"]),
                f"[{fmt_num(v['b_simple_low'])}, {fmt_num(v['b_simple_high'])}]",
                "-" if v["grad_sq"] is None else f"{v['grad_sq']:.3g}",
            ]
            for name, v in list(layers.items())[:MAX_LAYER_ROWS]
        ]
        lines += ["", table(["layer", "B_simple", "band", "|G|^2"], rows, right=[False, True, False, True])]
        if len(layers) > MAX_LAYER_ROWS:
            lines.append(f"... and {len(layers) - MAX_LAYER_ROWS} more (noisescale show --json)")
    return "\n".join(lines)
