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
MAX_SCHEDULE_ROWS = 12


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
                "groups": {str(g): v for g, v in reader.latest_groups().items()},
                "events": reader.events(),
            }
            sys.stdout.write(dumps_json(doc) + "\n")
            return 0
        layers = _last_layers(reader)
        groups = reader.latest_groups()
        schedule = batch_schedule(reader)
    print(text_summary(summary, layers, groups))
    if schedule:
        print("\n" + schedule)
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


def batch_schedule(reader: Any) -> str:
    """Batch size and learning rate over examples seen, one row per change (``""`` if the batch never changed
    and no learning rate was logged)."""
    rows = reader.measurements()
    lr = reader.metric("lr")
    scale = reader.metric("lr_scale")
    if not rows or (len(lr) == 0 and len({r["batch_size"] for r in rows}) < 2):
        return ""
    lr_at = dict(zip(lr.step, lr.value, strict=True))
    scale_at = dict(zip(scale.step, scale.value, strict=True))
    marks = [
        i
        for i, r in enumerate(rows)
        if i in (0, len(rows) - 1)
        or r["batch_size"] != rows[i - 1]["batch_size"]
        or lr_at.get(r["step"]) != lr_at.get(rows[i - 1]["step"])
    ]
    if len(marks) > MAX_SCHEDULE_ROWS:  # keep the first and last, and evenly spaced ones between
        picks = {round(j * (len(marks) - 1) / (MAX_SCHEDULE_ROWS - 1)) for j in range(MAX_SCHEDULE_ROWS)}
        marks = [marks[j] for j in sorted(picks)]
    body = [
        [
            f"{r['step']:,}",
            f"{r['examples'] - r['batch_size']:,}",  # examples seen before this step
            f"{r['batch_size']:,}",
            "-" if lr_at.get(r["step"]) is None else f"{lr_at[r['step']]:.4g}",
            "-" if scale_at.get(r["step"]) is None else f"{scale_at[r['step']]:.3g}",
        ]
        for r in (rows[i] for i in marks)
    ]
    changes = sum(1 for e in reader.events() if e["kind"] == "controller")
    head = f"batch size and learning rate over examples seen ({changes} controller decisions recorded)"
    return head + "\n" + table(["step", "examples", "batch", "lr", "lr scale"], body, right=[True] * 5)


def text_summary(
    s: dict[str, Any], layers: dict[str, dict[str, Any]], groups: dict[int, dict[str, Any]] | None = None
) -> str:
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
    pre = s.get("b_precond")
    if pre is not None:
        lines.append(
            f"B_precond {fmt_num(pre['last'])} [{fmt_num(pre['low'])}, {fmt_num(pre['high'])}] at step "
            f"{pre['step'] if pre['step'] is not None else '-'} (Adam's preconditioned noise scale)"
        )
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
    if groups:
        from noisescale.cli.data import groups_table

        step = next(iter(groups.values()))["step"]
        lines += ["", f"groups at step {step} (noisescale data RUN for the examples)", groups_table(groups)]
    return "\n".join(lines)
