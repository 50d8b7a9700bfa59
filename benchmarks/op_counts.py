#!/usr/bin/env python3
"""Operators launched per training step, counted by torch.profiler on the CPU: the monitor's kernel bill, without a GPU.

On an accelerator a small model's step is bounded by launching kernels from Python, not by arithmetic, so the
number of operators the monitor adds per step (and per measured layer) is what to keep small.  The profiler sees
every ATen operator on the CPU as well; this script counts them for each workload and mode of ``overhead.py``
(after a warm-up, over ``--steps`` steps), split into *compute* operators (those that run a kernel) and *views*
(reshape, transpose, ...: metadata only, no kernel on a GPU either), and the operators added over the mode's
baseline.  ``tests/unit/test_lean_kernels.py`` pins the per-layer count so it cannot grow unnoticed.

    python benchmarks/op_counts.py
    python benchmarks/op_counts.py --workloads tiny_transformer --modes ns_example,ns_every10

Writes ``--out`` (JSON, default ``benchmarks/results/op_counts.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _modes import MODES, Mode, Skip  # noqa: E402
from _workloads import N_BATCHES, WORKLOADS, Workload  # noqa: E402

DEFAULT_OUT = HERE / "results" / "op_counts.json"
DEFAULT_MODES = ("plain", "ns_example", "ns_every10", "ns_disarmed", "plain_accum", "ns_microbatch")
# Operators that only make a new view of existing storage, or allocate, or read metadata: no kernel runs.
VIEWS = frozenset(
    "aten::" + n
    for n in (
        "view as_strided reshape transpose t permute unsqueeze squeeze expand slice select alias detach "
        "_reshape_alias flatten unflatten split chunk narrow contiguous resolve_conj resolve_neg result_type "
        "empty empty_like empty_strided _unsafe_view lift_fresh numpy_T matrix_H unbind broadcast_to"
    ).split()
)


def count(mode: Mode, wl: Workload, steps: int) -> dict[str, float]:
    """Mean ATen operators per step of ``mode`` (after ``mode`` has run its warm-up)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            mode.step(*wl.batches[i % N_BATCHES])
    every = {e.key: e.count / steps for e in prof.key_averages() if e.key.startswith("aten::")}
    views = sum(v for k, v in every.items() if k in VIEWS)
    total = sum(every.values())
    return {"total": total, "views": views, "compute": total - views}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--steps", type=int, default=20, help="profiled steps per mode (a multiple of 10 for cadences)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [m for m in args.modes.split(",") if m]
    results: dict[str, Any] = {"torch": torch.__version__, "steps": args.steps, "workloads": {}}
    lines = [
        "| workload | mode | operators per step | compute | views | compute added over the baseline |",
        "|---|---|---|---|---|---|",
    ]
    for wname in [w for w in args.workloads.split(",") if w]:
        wl = WORKLOADS[wname]()
        state = wl.initial_state()
        got: dict[str, dict[str, float]] = {}
        for name in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mode = MODES[name](wl, state)
                    for i in range(3):  # warm-up: the first step checks what it must once
                        mode.step(*wl.batches[i % N_BATCHES])
                    got[name] = count(mode, wl, args.steps)
                    mode.close()
            except Skip:
                continue
        for name, c in got.items():
            base = MODES[name].baseline
            added = c["compute"] - got[base]["compute"] if base in got else None
            c["compute_added"] = added  # type: ignore[assignment]
            lines.append(
                f"| {wname} | {name} | {c['total']:.1f} | {c['compute']:.1f} | {c['views']:.1f} | "
                f"{'-' if added is None else f'{added:+.1f}'} |"
            )
        results["workloads"][wname] = got
        print(f"[{wname}] done", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
