#!/usr/bin/env python3
"""Does ``ns.plan``, fitted on one run, predict the steps and examples of runs it did not see?

Reads the run stores of ``benchmarks/adaptive.py`` (``benchmarks/results/adaptive/runs/``: config ``{schedule,
batch_size, lr, seed, workload, target_loss}``, the training ``loss`` logged each step), or with ``--generate``
trains its own on the demo's digits MLP first (``_plan_generate.py``).  Per workload and seed:

* every run's steps and examples to its target loss are read off its loss, averaged over a centred window of
  ``--loss-window`` examples (the same window for every run, and for the plan);
* of the runs that differ only in their learning rate, the one that reached the target in the fewest steps is
  kept (the model assumes a tuned learning rate);
* each kept run in turn is the one run ``plan`` is fitted on; it predicts every other kept run: a fixed
  batch as ``Fixed(B)``, any other schedule (ramp, noise follower, the controller) by replaying that run's batch
  size as a function of the examples seen (``Replay``);
* the error of a prediction is ``predicted / actual - 1``, for steps and for examples.

The goal ("within 20%") is checked on the medians over seeds of the plans fitted on fixed runs the planner does not
warn about (``above_critical``: the run's batch stayed at or below its own critical batch), and reported for every
other choice of run.  Usage::

    python benchmarks/plan_check.py --generate            # train the runs (5-12 minutes on one core), then check
    python benchmarks/plan_check.py                        # check the runs already there
    python benchmarks/plan_check.py --runs DIR --tolerance 0.2 --out benchmarks/results/plan_check/plan_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import noisescale as ns
from noisescale.planning import Fixed, PlanError, Replay
from noisescale.planning.caveats import ABOVE_CRITICAL
from noisescale.planning.stretches import crossing, smooth_loss
from noisescale.store import open_run, run_files

HERE = Path(__file__).resolve().parent
ADAPTIVE_RUNS = HERE / "results" / "adaptive" / "runs"
OWN_DIR = HERE / "results" / "plan_check"


def read_run(path: Path, window_of: dict[str, float]) -> dict[str, Any] | None:
    """A run's config, batch sizes over examples, and its steps and examples to its target loss."""
    with open_run(path) as r, r.snapshot():
        info = r.info
        rows = r.measurements()
        loss = r.metric("loss")
    cfg = info.config
    if not rows or not len(loss) or "target_loss" not in cfg:
        return None
    ex_of = {int(m["step"]): int(m["examples"]) for m in rows}
    pts = [
        (s, float(e if e is not None else ex_of.get(s, math.nan)), v)
        for s, e, v in zip(loss.step, loss.examples, loss.value)
        if v is not None and math.isfinite(v)
    ]
    pts = [p for p in pts if math.isfinite(p[1])]
    window = window_of[str(cfg.get("workload"))]
    sm = smooth_loss([p[1] for p in pts], [p[2] for p in pts], window)
    hit = crossing([p[0] for p in pts], sm, float(cfg["target_loss"]))
    batches = [int(m["batch_size"]) for m in rows]
    return {
        "path": str(path),
        "name": info.name,
        "config": cfg,
        "fixed": len(set(batches)) == 1,
        "batch": batches[0] if len(set(batches)) == 1 else None,
        "examples_at": [int(m["examples"]) for m in rows],
        "batches": batches,
        "steps": hit,
        "examples": ex_of.get(hit) if hit is not None else None,
        "window": window,
    }


def keep_tuned(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of the runs whose config differs only in the learning rate, the one with the fewest steps to the target."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["steps"] is None:
            continue
        key = {k: v for k, v in r["config"].items() if k != "lr"}
        groups[json.dumps(key, sort_keys=True, default=str)].append(r)
    return [min(g, key=lambda r: (r["steps"], r["examples"])) for g in groups.values()]


def label(r: dict[str, Any]) -> str:
    return f"fixed {r['batch']}" if r["fixed"] else str(r["config"].get("schedule"))


def check_group(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fit ``plan`` on each fixed run of one workload and seed, predict all the others."""
    out = []
    for ref in runs:
        others = [r for r in runs if r is not ref]
        schedules = [
            Fixed(r["batch"]) if r["fixed"] else Replay(r["examples_at"], r["batches"], label=label(r)) for r in others
        ]
        try:
            p = ns.plan(
                ref["path"],
                target_loss=float(ref["config"]["target_loss"]),
                loss_window=ref["window"],
                batches=[],
                ramp=None,
                follow=(),
                schedules=schedules,
            )
        except PlanError as e:
            out.append({"reference": label(ref), "error": str(e)})
            continue
        preds = []
        for r, q in zip(others, p.predictions[1:]):
            preds.append(
                {
                    "target": label(r),
                    "actual_steps": r["steps"],
                    "actual_examples": r["examples"],
                    "steps": q.steps,
                    "examples": q.examples,
                    "steps_range": list(q.steps_range),
                    "examples_range": list(q.examples_range),
                    "steps_error": q.steps / r["steps"] - 1,
                    "examples_error": q.examples / r["examples"] - 1,
                    "in_range": q.steps_range[0] <= r["steps"] <= q.steps_range[1],
                }
            )
        out.append(
            {
                "reference": label(ref),
                "batch": ref["batch"],
                "critical_batch": p.critical_batch,
                "batch_max": p.batch_max,
                "above_critical": any(w.code == "above_critical" for w in p.warnings),
                "own_steps_error": p.steps / ref["steps"] - 1,
                "warnings": [w.code for w in p.warnings],
                "predictions": preds,
            }
        )
    return out


def worst(entry: dict[str, Any]) -> float:
    return max((max(abs(q["steps_error"]), abs(q["examples_error"])) for q in entry["predictions"]), default=math.nan)


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run fitted on (by label): the median over seeds of each prediction and of each actual, their error, and
    the median over seeds of its largest batch over its critical batch E_min / S_min."""
    acc: dict[str, dict[str, Any]] = defaultdict(lambda: {"ratio": [], "targets": defaultdict(list)})
    for res in results:
        for e in res["references"]:
            if "predictions" not in e:
                continue
            acc[e["reference"]]["ratio"].append(e["batch_max"] / e["critical_batch"])
            for q in e["predictions"]:
                acc[e["reference"]]["targets"][q["target"]].append(q)
    out = {}
    for ref, a in acc.items():
        cells = {}
        for t, qs in a["targets"].items():
            med = {
                k: statistics.median(q[k] for q in qs) for k in ("steps", "examples", "actual_steps", "actual_examples")
            }
            cells[t] = {
                **med,
                "seeds": len(qs),
                "steps_error": med["steps"] / med["actual_steps"] - 1,
                "examples_error": med["examples"] / med["actual_examples"] - 1,
            }
        out[ref] = {
            "batch_over_critical": statistics.median(a["ratio"]),
            "targets": cells,
            "worst": max(max(abs(c["steps_error"]), abs(c["examples_error"])) for c in cells.values()),
        }
    return out


def _order(label: str) -> tuple[int, int, str]:
    parts = label.split()
    if parts[0] == "fixed" and len(parts) == 2 and parts[1].isdigit():
        return (0, int(parts[1]), label)
    return (1, 0, label)


def _cell(c: dict[str, Any]) -> str:
    text = f"{100 * c['steps_error']:+.0f}%"
    if abs(c["steps_error"] - c["examples_error"]) > 5e-3:
        text += f"/{100 * c['examples_error']:+.0f}%"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=None, help="folder of run stores (default: adaptive.py's, if any)")
    ap.add_argument("--generate", action="store_true", help="train the digits runs first (into --out's folder)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="with --generate: one seed, three batches, two rates")
    ap.add_argument("--loss-window", type=float, default=None, help="examples (default: 4x the largest batch)")
    ap.add_argument("--target-loss", type=float, default=None, help="with --generate (default 0.01)")
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=OWN_DIR / "plan_check.json")
    args = ap.parse_args(argv)

    generated = None
    runs_dir = args.runs
    if args.generate:
        from _plan_generate import BATCHES, LRS, RAMP, TARGET_LOSS, generate

        runs_dir = runs_dir or args.out.parent / "runs"
        if runs_dir.exists():
            shutil.rmtree(runs_dir)
        seeds, batches, lrs = args.seeds, BATCHES, LRS
        if args.quick:
            seeds, batches, lrs = seeds[:1], (32, 64, 128), (0.4, 0.8)
        # The stopping rule and the check must average the loss over the same window.
        args.loss_window = window = args.loss_window or 4.0 * max(*batches, RAMP[1])
        print(
            f"training into {runs_dir} to loss {args.target_loss or TARGET_LOSS:g} (seeds {seeds}, batches "
            f"{list(batches)}, learning rates {list(lrs)})"
        )
        t0 = time.perf_counter()
        target = args.target_loss or TARGET_LOSS
        generated = generate(runs_dir, seeds=seeds, batches=batches, lrs=lrs, window=window, target=target)
        print(f"trained {len(generated)} runs in {time.perf_counter() - t0:.0f} s")
    if runs_dir is None:
        runs_dir = ADAPTIVE_RUNS if ADAPTIVE_RUNS.exists() and run_files(ADAPTIVE_RUNS) else OWN_DIR / "runs"
    files = run_files(runs_dir) if runs_dir.exists() else []
    if not files:
        print(f"no run stores in {runs_dir}: run benchmarks/adaptive.py, or this script with --generate")
        return 1

    # The loss window per workload: 4x its largest batch unless given (every run of a workload uses the same one).
    configs = []
    for f in files:
        with open_run(f) as r:
            configs.append((f, r.info.config, max((m["batch_size"] for m in r.measurements()), default=1)))
    window_of: dict[str, float] = {}
    for _, cfg, bmax in configs:
        w = str(cfg.get("workload"))
        window_of[w] = max(window_of.get(w, 0.0), args.loss_window or 4.0 * bmax)
    runs = [r for r in (read_run(f, window_of) for f, _, _ in configs) if r is not None]
    by_group: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in keep_tuned(runs):
        by_group[(str(r["config"].get("workload")), r["config"].get("seed"))].append(r)
    not_reached = [r["name"] for r in runs if r["steps"] is None]

    results = []
    for (workload, seed), group in sorted(by_group.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        group.sort(key=lambda r: (not r["fixed"], r["batch"] or 0, label(r)))
        print(f"\n{workload}, seed {seed}: {len(group)} tuned runs (loss window {window_of[workload]:,.0f} examples)")
        for r in group:
            print(
                f"  {label(r):<12} lr {r['config'].get('lr')!s:<6} {r['steps']:>6} steps {r['examples']:>9,} examples"
            )
        entries = check_group(group)
        results.append({"workload": workload, "seed": seed, "runs": group, "references": entries})
        for e in entries:
            if "error" in e:
                print(f"  fitted on {e['reference']}: refused: {e['error']}")
                continue
            print(
                f"  fitted on {e['reference']} (B_crit {e['critical_batch']:.0f}, largest batch "
                f"{e['batch_max']:.0f}{', above_critical' if e['above_critical'] else ''})"
            )
            cells = ", ".join(
                f"{q['target']} {100 * q['steps_error']:+.0f}%"
                + (f"/{100 * q['examples_error']:+.0f}%" if abs(q["steps_error"] - q["examples_error"]) > 5e-3 else "")
                for q in e["predictions"]
            )
            print(f"    steps[/examples] error: {cells}; worst {100 * worst(e):.0f}%")

    # Medians over seeds are taken per workload: a "fixed 16" of one workload says nothing of another's.
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    eligible_by: dict[str, list[str]] = {}
    ok = True
    for workload in sorted({str(res["workload"]) for res in results}):
        summary = summarize([res for res in results if str(res["workload"]) == workload])
        summaries[workload] = summary
        print(
            f"\n{workload}, median over seeds: predicted / actual - 1, steps[/examples] (fitted on the row, "
            "predicting the column)"
        )
        targets = sorted({t for row in summary.values() for t in row["targets"]}, key=_order)
        print(f"  {'fitted on':<12} {'Bmax/Bcrit':>10}  " + "".join(f"{t:>14}" for t in targets) + f"{'worst':>8}")
        for ref in sorted(summary, key=_order):
            row = summary[ref]
            cells = ""
            for t in targets:
                c = row["targets"].get(t)
                cells += f"{'':>14}" if c is None else f"{_cell(c):>14}"
            print(f"  {ref:<12} {row['batch_over_critical']:10.2f}  {cells}{100 * row['worst']:7.0f}%")
        # The planner warns (above_critical) when a run's batch went above ABOVE_CRITICAL x its own critical
        # batch; the target is checked on the runs it does not warn about, and reported for all.
        eligible = [
            ref
            for ref, row in summary.items()
            if ref.startswith("fixed") and row["batch_over_critical"] <= ABOVE_CRITICAL
        ]
        eligible_by[workload] = eligible
        passed = bool(eligible) and all(summary[ref]["worst"] <= args.tolerance for ref in eligible)
        ok = ok and passed
        names = ", ".join(sorted(eligible, key=_order))
        print(
            f"{workload}: fitted on a fixed run whose batch stayed at or below its critical batch ({names}): "
            f"worst median error {100 * max((summary[r]['worst'] for r in eligible), default=math.nan):.0f}% "
            f"(target {100 * args.tolerance:.0f}%): {'PASS' if passed else 'FAIL'}"
        )
    cells = [c for summary in summaries.values() for row in summary.values() for c in row["targets"].values()]
    med_within = sum(max(abs(c["steps_error"]), abs(c["examples_error"])) <= args.tolerance for c in cells)
    print(f"medians over seeds, every fit: {med_within} of {len(cells)} predictions within {100 * args.tolerance:.0f}%")
    all_preds = [q for res in results for e in res["references"] for q in e.get("predictions", [])]
    within = [max(abs(q["steps_error"]), abs(q["examples_error"])) <= args.tolerance for q in all_preds]
    print(f"single seeds, every fit: {sum(within)} of {len(within)} predictions within {100 * args.tolerance:.0f}%")
    if not_reached:
        print(f"runs that never reached their target (left out): {len(not_reached)}")
    doc = {
        "runs_dir": str(runs_dir),
        "tolerance": args.tolerance,
        "pass": ok,
        "eligible_references": eligible_by,
        "summary": summaries,
        "within_tolerance": {"count": sum(within), "of": len(within)},
        "medians_within_tolerance": {"count": med_within, "of": len(cells)},
        "median_abs_steps_error": statistics.median(abs(q["steps_error"]) for q in all_preds) if all_preds else None,
        "groups": results,
        "not_reached": not_reached,
        "generated": generated,
        "load_average": os.getloadavg(),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "noisescale": ns.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {args.out} (load average {os.getloadavg()[0]:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
