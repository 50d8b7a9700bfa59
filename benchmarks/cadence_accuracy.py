#!/usr/bin/env python3
"""What measuring less costs in accuracy: a budget's and a cadence's estimate against the every-step one, and the
sketch's raw per-step B_simple against the exact one.

1. ``demo``: the digits demo (``noisescale demo``'s MLP, SGD, batch 128, 800 steps) trained once per monitor
   setting from the same seed, so every run follows the same trajectory bit for bit (the monitor never changes
   training): every step, ``budget=0.03`` and ``every=10``.  For each step from ``--from-step`` on it reports
   whether the sparse run's smoothed B_simple lies inside the every-step run's band, the share of steps measured,
   and the final values.
2. ``sketch``: raw per-step B_simple at fixed parameters over ``--batches`` batches, exact and with ``sketch=64``
   (same batches): the relative standard error of each (standard deviation over the mean), and of their
   difference (the sketch's own error).  On the charlm demo (width 64, context 64: the sketch does not pay
   there, so no layer is sketched and the two agree bit for bit) and on the 1-block transformer of
   ``scaling.py`` at d=256, T=256 (where every Linear is sketched).

    python benchmarks/cadence_accuracy.py
    python benchmarks/cadence_accuracy.py --parts demo --steps 400

Writes ``--out`` (JSON, default ``benchmarks/results/cadence_accuracy.json``) and prints the findings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import noisescale as ns  # noqa: E402
from _workloads import TinyGPT  # noqa: E402
from noisescale.sink import BaseSink  # noqa: E402

DEFAULT_OUT = HERE / "results" / "cadence_accuracy.json"


def demo_run(steps: int, seed: int, **monitor: Any) -> dict[str, Any]:
    """One digits-demo training run with ``GNSMonitor(**monitor)``; per step: status, b_simple, band."""
    from noisescale.demo.digits import make_digits_task

    task = make_digits_task(seed=seed)
    rows, cadences = [], []

    class Keep(BaseSink):
        def on_event(self, event: Any) -> None:
            if event.kind == "cadence":
                cadences.append((event.step, (event.data or {}).get("every")))

    mon = ns.GNSMonitor(task.model, source="example", sinks=[Keep()], **monitor)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = task.batch(128)
        task.loss(task.model(x), y).backward()
        m = mon.step(batch_size=128)
        rows.append((m.status, m.b_simple, m.b_simple_low, m.b_simple_high))
        task.optimizer.step()
        task.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    mon.flush()
    mon.close()
    return {"rows": rows, "cadences": cadences, "seconds": seconds}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    runs = {
        "every_step": demo_run(args.steps, args.seed),
        "budget_0.03": demo_run(args.steps, args.seed, budget=0.03),
        "every_10": demo_run(args.steps, args.seed, every=10),
    }
    ref = runs["every_step"]["rows"]
    out: dict[str, Any] = {"steps": args.steps, "from_step": args.from_step, "runs": {}}
    for name, run in runs.items():
        rows = run["rows"]
        inside = [
            low is not None and high is not None and b is not None and low <= b <= high
            for (_, b, _, _), (_, _, low, high) in zip(rows[args.from_step - 1 :], ref[args.from_step - 1 :])
        ]
        measured = sum(1 for r in rows if r[0] != "unmeasured")
        final, final_ref = rows[-1], ref[-1]
        out["runs"][name] = {
            "measured_steps": measured,
            "measured_share": measured / len(rows),
            "inside_every_step_band": sum(inside) / len(inside),
            "final_b_simple": final[1],
            "final_band": [final[2], final[3]],
            "final_inside": bool(
                final_ref[2] is not None and final[1] is not None and final_ref[2] <= final[1] <= final_ref[3]
            ),
            "seconds": run["seconds"],
            "cadences": run["cadences"][:40],
        }
        r = out["runs"][name]
        print(
            f"[demo] {name}: measured {measured}/{len(rows)} steps; its B_simple inside the every-step band at "
            f"{100 * r['inside_every_step_band']:.1f}% of steps {args.from_step}..{args.steps}; final {final[1]:.4g} "
            f"(every-step {final_ref[1]:.4g} [{final_ref[2]:.4g}, {final_ref[3]:.4g}]); {run['seconds']:.1f} s",
            flush=True,
        )
    return out


def raw_b_simple(model: torch.nn.Module, batches: list[Any], loss: Any, b: int, sketch: int | None) -> list[float]:
    mon = ns.GNSMonitor(model, source="example", sketch=sketch)
    out = []
    for batch in batches:
        loss(model, batch).backward()
        m = mon.step(batch_size=b)
        out.append(m.b_simple_raw)
        model.zero_grad(set_to_none=True)
    mon.close()
    return out


def _rse(values: list[float | None]) -> float:
    v = [x for x in values if x is not None]
    return statistics.stdev(v) / abs(statistics.mean(v))


def sketch_case(name: str, model: torch.nn.Module, batches: list[Any], loss: Any, b: int) -> dict[str, Any]:
    exact = raw_b_simple(model, batches, loss, b, None)
    sketched = raw_b_simple(model, batches, loss, b, 64)
    diff = [s - e for s, e in zip(sketched, exact) if s is not None and e is not None]
    mean = abs(statistics.mean([e for e in exact if e is not None]))
    res = {
        "batches": len(batches),
        "rse_exact": _rse(exact),
        "rse_sketch": _rse(sketched),
        "rse_ratio": _rse(sketched) / _rse(exact),
        "sketch_error_rse": statistics.stdev(diff) / mean if len(diff) > 1 else 0.0,
        "identical": exact == sketched,
    }
    print(
        f"[sketch] {name}: relative standard error of the raw B_simple: exact {res['rse_exact']:.3f}, sketch=64 "
        f"{res['rse_sketch']:.3f} ({res['rse_ratio']:.2f}x); the sketch's own error {res['sketch_error_rse']:.4f}"
        f"{' (no layer sketched: identical)' if res['identical'] else ''}",
        flush=True,
    )
    return res


def sketch(args: argparse.Namespace) -> dict[str, Any]:
    from noisescale.demo.charlm import make_charlm_task

    out: dict[str, Any] = {}
    task = make_charlm_task(seed=args.seed)
    batches = [task.batch(32) for _ in range(args.batches)]

    def char_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return task.loss(model(batch[0]), batch[1])

    out["charlm_demo"] = sketch_case("charlm demo (width 64, T 64, batch 32)", task.model, batches, char_loss, 32)
    torch.manual_seed(args.seed)
    gpt = TinyGPT(vocab=96, ctx=256, d=256, heads=4, n_layer=1)
    gen = torch.Generator().manual_seed(args.seed)
    ids = [torch.randint(0, 96, (16, 257), generator=gen) for _ in range(args.batches)]

    def gpt_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(batch[:, :-1]).reshape(-1, 96), batch[:, 1:].reshape(-1))

    out["gpt_d256_t256"] = sketch_case("1-block transformer d=256, T=256, batch 16", gpt, ids, gpt_loss, 16)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="demo,sketch")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--from-step", type=int, default=100, help="first step compared (the averages settle before)")
    ap.add_argument("--batches", type=int, default=30, help="batches at fixed parameters for the sketch part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    if "demo" in parts:
        results["demo"] = demo(args)
    if "sketch" in parts:
        results["sketch"] = sketch(args)
    results["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
