#!/usr/bin/env python3
"""Steps and examples to a target training loss: fixed batches, a linear ramp and the ``gns`` controller.

On each workload (``_adaptive_tasks.py``: the digits MLP with SGD and momentum, the byte-level transformer with
AdamW) every schedule is trained from several seeds until its training loss (on a fixed evaluation set) reaches
the target; the optimizer steps S and examples E it took are interpolated between evaluations
(``_adaptive_train.py``).  Every run's learning rate follows the batch by the workload's rule (linear for SGD,
square root for AdamW) from one reference learning rate, times each multiplier of a small grid; a schedule's
result is its best multiplier (fewest median steps).

The fixed batches give the frontier: S = S_min (1 + B_noise / B), E = E_min (1 + B / B_noise) (McCandlish et al.
2018, eq. 2.11), fitted to their medians (least squares on relative errors of S = S_min + E_min / B).  A
point lies on or beyond the fitted curve when (S / S_min - 1)(E / E_min - 1) <= 1.  The targets (issue 12):
``gns`` needs at most 0.6x the steps of the fixed batch that needs the fewest examples, with at most 1.15x its
examples; its held-out loss at the examples budget is within 1% of the best fixed batch's; its point lies on or
beyond the curve.  Ablations (``gns ...``) change one choice each, to show which ones matter.

Every training run is a run store under ``<out>/runs/`` (config: schedule, batch_size, lr, seed, workload,
target_loss; metrics: loss every step, train_loss and val_loss at evaluations; the monitor's B_simple; the
controller's events), for ``noisescale show`` and the planner.  Usage::

    python benchmarks/adaptive.py --quick                      # smoke test, about a minute
    python benchmarks/adaptive.py                              # both workloads (about 1.5 hours on 2 busy cores)
    python benchmarks/adaptive.py --workloads digits --variants gns,naive --seeds 5

Writes ``<out>/adaptive.json`` and, with matplotlib (``pip install 'noisescale[report]'``), one PNG of S against E
per workload.  The targets are reported, not enforced.
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from _adaptive_tasks import WORKLOADS, Workload
from _adaptive_train import Spec, train

# The recommended controller, then ablations that change one choice each (merged into the workload's gns dict).
GNS: dict[str, Any] = {
    "k": 1.5,
    "lr_rule": "adascale",
    "dwell": 1_000,
    "hysteresis": 0.25,
    "use_band": True,
    "max_factor": 2.0,
    "start": "min",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "gns": {},
    # batch = k x B_simple re-decided every step, rounded to a power of two, the fixed batches' learning-rate rule
    "naive": {"k": 1.0, "lr_rule": "workload", "use_band": False, "hysteresis": 0.0, "dwell": 0, "max_factor": 64.0},
    "gns k=1": {"k": 1.0},
    "gns k=2": {"k": 2.0},
    "gns no band": {"use_band": False},
    "gns no dwell": {"dwell": 0},
    "gns no hysteresis": {"hysteresis": 0.0},
    "gns from lr batch": {"start": "ref"},
    "gns lr rule": {"lr_rule": "workload"},  # the fixed batches' rule: linear (SGD), sqrt (AdamW)
    "gns lr none": {"lr_rule": "none"},
    # measured from 4 micro-batches a step, following Adam's preconditioned noise scale, or the plain one
    "gns precond": {"micro": True, "signal": "b_precond"},
    "gns precond k=0.75": {"micro": True, "signal": "b_precond", "k": 0.75},
    "gns precond k=0.5": {"micro": True, "signal": "b_precond", "k": 0.5},
    "gns precond k=0.35": {"micro": True, "signal": "b_precond", "k": 0.35},
    "gns micro": {"micro": True},
}
TARGETS = {"steps": 0.6, "examples": 1.15, "heldout": 1.01}


def gns_spec(w: Workload, name: str) -> Spec:
    settings = {**GNS, **VARIANTS[name]}
    start = settings.pop("start", "ref")
    micro = settings.pop("micro", False)
    settings["batch_size"] = w.gns["min_batch"] if start == "min" else w.batch_ref
    return Spec(name, "gns", None, settings, micro=micro)


def specs_for(w: Workload, variants: list[str], batches: tuple[int, ...]) -> list[Spec]:
    out = [Spec(f"fixed {b}", "fixed", b) for b in batches]
    out.append(Spec(f"ramp {w.ramp[0]}->{w.ramp[1]}", "linear_ramp"))
    # Adam's preconditioned noise scale exists only where Adam trains (the digits MLP trains with SGD).
    out += [gns_spec(w, v) for v in variants if w.adam or VARIANTS[v].get("signal") != "b_precond"]
    return out


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One schedule at one learning rate over seeds: medians and spread (None where a seed missed the target)."""
    steps = [r["steps"] for r in results if r["steps"] is not None]
    examples = [r["examples"] for r in results if r["examples"] is not None]
    held = [r["heldout_at_budget"] for r in results if r["heldout_at_budget"] is not None]
    ok = len(steps) == len(results)
    return {
        "reached": f"{len(steps)}/{len(results)}",
        "steps": _median(steps) if ok else None,
        "steps_range": [min(steps), max(steps)] if steps else None,
        "examples": _median(examples) if ok else None,
        "examples_range": [min(examples), max(examples)] if examples else None,
        "heldout": _median(held) if held else None,
        "heldout_range": [min(held), max(held)] if held else None,
        "seconds": sum(r["seconds"] for r in results),
    }


def best_of_grid(by_mult: dict[float, dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """The multiplier with all seeds reaching the target and the fewest median steps (else the most reached)."""

    def key(item: tuple[float, dict[str, Any]]) -> tuple[int, float]:
        s = item[1]
        done = int(s["reached"].split("/")[0])
        return (-done, s["steps"] if s["steps"] is not None else math.inf)

    return min(by_mult.items(), key=key)


def fit_frontier(points: list[tuple[int, float]]) -> dict[str, float] | None:
    """Fit S = S_min + E_min / B to ``(B, S)`` by least squares on relative errors; ``None`` if it fails."""
    if len(points) < 2:
        return None
    # rows (1/S, 1/(B S)) . (S_min, E_min) ~ 1
    a11 = sum(1 / s**2 for _, s in points)
    a12 = sum(1 / (b * s**2) for b, s in points)
    a22 = sum(1 / (b * s) ** 2 for b, s in points)
    r1 = sum(1 / s for _, s in points)
    r2 = sum(1 / (b * s) for b, s in points)
    det = a11 * a22 - a12 * a12
    if det == 0:
        return None
    s_min = (r1 * a22 - r2 * a12) / det
    e_min = (a11 * r2 - a12 * r1) / det
    if s_min <= 0 or e_min <= 0:
        return None
    return {"S_min": s_min, "E_min": e_min, "B_noise": e_min / s_min}


def frontier_product(fit: dict[str, float], steps: float, examples: float) -> float | None:
    """(S / S_min - 1)(E / E_min - 1): 1 on the fitted curve, below 1 beyond it (``None`` inside the limits)."""
    xs, xe = steps / fit["S_min"] - 1, examples / fit["E_min"] - 1
    if xs <= 0 or xe <= 0:
        return 0.0
    return xs * xe


def run_workload(w: Workload, args: argparse.Namespace, runs_dir: Path | None) -> dict[str, Any]:
    batches = tuple(args.batches) if args.batches else w.sweep
    seeds = args.seeds if args.seeds is not None else list(range(w.seeds))
    specs = specs_for(w, args.variants, batches)
    if args.skip_fixed:
        specs = [spec for spec in specs if spec.schedule != "fixed"]

    def grid(spec: Spec) -> list[float]:
        return args.grid if spec.schedule == "fixed" else args.adaptive_grid

    runs: list[dict[str, Any]] = []
    total = sum(len(grid(spec)) for spec in specs) * len(seeds)
    for spec in specs:
        for mult in grid(spec):
            for seed in seeds:
                r = train(w, spec, seed=seed, lr_mult=mult, runs_dir=runs_dir, max_examples=args.max_examples)
                runs.append(asdict(r))
                shown = "-" if r.steps is None else f"{r.steps:.0f} steps, {r.examples:,.0f} examples"
                print(
                    f"  [{len(runs)}/{total}] {w.name} {spec.label} lr x{mult:g} seed {seed}: {shown} "
                    f"({r.seconds:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "workload": w.name,
        "description": w.description,
        "seeds": seeds,
        "target_loss": w.target_loss,
        "budget": w.budget,
        "lr_rule": w.lr_rule,
        "lr_ref": w.lr_ref,
        "batch_ref": w.batch_ref,
        "halflife": w.halflife,
        "specs": [asdict(spec) for spec in specs],
        "runs": runs,
    }


def build_rows(res: dict[str, Any]) -> dict[str, Any]:
    """One row per schedule (in ``specs`` order), at its best learning-rate multiplier, from ``runs``."""
    rows = []
    for spec in res["specs"]:
        by_mult: dict[float, list[dict[str, Any]]] = {}
        for r in res["runs"]:
            if r["label"] == spec["label"]:
                by_mult.setdefault(r["lr_mult"], []).append(r)
        summaries = {m: summarize(rs) for m, rs in sorted(by_mult.items())}
        mult, best = best_of_grid(summaries)
        rows.append(
            {
                **{k: spec[k] for k in ("label", "schedule", "batch_size", "controller")},
                "lr_mult": mult,
                **best,
                "by_mult": summaries,
            }
        )
    res["rows"] = rows
    return res


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s runs added to ``old``'s (``--append``), schedules in order of first appearance."""
    specs = old.get("specs") or [
        {"label": r["label"], "schedule": r["schedule"], "batch_size": r["batch_size"], "controller": r["controller"]}
        for r in old["rows"]
    ]
    labels = {s["label"] for s in specs}
    out = {
        **old,
        "runs": old["runs"] + new["runs"],
        "specs": specs + [s for s in new["specs"] if s["label"] not in labels],
    }
    out["seeds"] = sorted(set(old.get("seeds", [])) | set(new["seeds"]))
    return out


def local_product(fixed: list[dict[str, Any]], steps: float, examples: float) -> float | None:
    """``frontier_product`` against the curve through the two fixed batches whose steps bracket ``steps`` (the
    nearest two at either end): where the point stands among its neighbours, whatever the global fit's misfit."""
    pts = sorted((r["batch_size"], r["steps"]) for r in fixed)
    if len(pts) < 2:
        return None
    i = next((j for j in range(len(pts) - 1) if pts[j + 1][1] <= steps), len(pts) - 2)
    (b0, s0), (b1, s1) = pts[i], pts[i + 1]
    # S = S_min + E_min / B through both points
    e_min = (s0 - s1) / (1 / b0 - 1 / b1)
    s_min = s0 - e_min / b0
    if s_min <= 0 or e_min <= 0:
        return None
    return frontier_product({"S_min": s_min, "E_min": e_min}, steps, examples)


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a is not b and a["steps"] <= b["steps"] and a["examples"] <= b["examples"]


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    """Fill in the fit, the anchor and every row's ratios, frontier products and targets met."""
    rows = res["rows"]
    reached = [r for r in rows if r["schedule"] == "fixed" and r["steps"] is not None]
    # The model has S falling and E rising with B: a fixed batch that needs more steps *and* more examples than
    # another lies outside it (typically one so small that its learning rate, not the noise, limits it).
    fixed = [r for r in reached if not any(_dominates(o, r) for o in reached)]
    res["off_model"] = [r["label"] for r in reached if r not in fixed]
    fit = fit_frontier([(r["batch_size"], r["steps"]) for r in fixed])
    anchor = min(fixed, key=lambda r: r["examples"]) if fixed else None
    every_fixed = [r for r in rows if r["schedule"] == "fixed"]
    best_held = min((r["heldout"] for r in every_fixed if r["heldout"] is not None), default=None)
    for r in rows:
        if r["steps"] is None:
            continue
        r["frontier_product"] = frontier_product(fit, r["steps"], r["examples"]) if fit else None
        off = r["label"] in res["off_model"]
        r["local_product"] = None if off else local_product(fixed, r["steps"], r["examples"])
        if anchor is not None:
            r["steps_ratio"] = r["steps"] / anchor["steps"]
            r["examples_ratio"] = r["examples"] / anchor["examples"]
        if best_held is not None and r["heldout"] is not None:
            r["heldout_ratio"] = r["heldout"] / best_held
        r["meets"] = {
            "steps": r.get("steps_ratio", math.inf) <= TARGETS["steps"],
            "examples": r.get("examples_ratio", math.inf) <= TARGETS["examples"],
            "heldout": r.get("heldout_ratio", math.inf) <= TARGETS["heldout"],
            "frontier": r.get("frontier_product") is not None and r["frontier_product"] <= 1.0,
        }
    res["fit"] = fit
    res["anchor"] = anchor["label"] if anchor else None
    return res


def _f(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def table(res: dict[str, Any]) -> str:
    fit = res["fit"]
    head = (
        f"{res['workload']}: {res['description']}; seeds {res.get('seeds', '?')}\n"
        f"target training loss {res['target_loss']:g}; held-out loss compared at {res['budget']:,} examples; "
        f"lr rule {res['lr_rule']} from {res['lr_ref']:g} at batch {res['batch_ref']}\n"
    )
    if fit:
        head += (
            "fit over the fixed batches"
            + (
                f" but {', '.join(res['off_model'])} (more steps and more examples than another)"
                if res.get("off_model")
                else ""
            )
            + f": S_min {fit['S_min']:,.0f}, E_min {fit['E_min']:,.0f}, "
            f"B_noise {fit['B_noise']:,.0f}; ratios against {res['anchor']} (fewest examples); frontier: "
            "(S/S_min - 1)(E/E_min - 1) on the fit, local: on the curve through the two fixed batches around S "
            "(<= 1: on or beyond)\n"
        )
    cols = [
        "schedule",
        "lr x",
        "reached",
        "steps [range]",
        "examples [range]",
        "held-out",
        "steps x",
        "examples x",
        "held-out x",
        "frontier",
        "local",
    ]
    lines = []
    for r in res["rows"]:
        sr, er = r.get("steps_range"), r.get("examples_range")
        lines.append(
            [
                r["label"],
                f"{r['lr_mult']:g}",
                r["reached"],
                f"{_f(r['steps'])} [{_f(sr and sr[0])}-{_f(sr and sr[1])}]",
                f"{_f(r['examples'])} [{_f(er and er[0])}-{_f(er and er[1])}]",
                _f(r["heldout"], ".4f"),
                _f(r.get("steps_ratio"), ".2f"),
                _f(r.get("examples_ratio"), ".2f"),
                _f(r.get("heldout_ratio"), ".3f"),
                _f(r.get("frontier_product"), ".2f"),
                _f(r.get("local_product"), ".2f"),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in lines)) for i, c in enumerate(cols)]
    out = [head, "  ".join(c.ljust(widths[i]) for i, c in enumerate(cols))]
    out += ["  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(row)) for row in lines]
    g = next((r for r in res["rows"] if r["label"] == "gns"), None)
    if g is not None and "meets" in g:
        m = g["meets"]
        out.append(
            f"\ngns against the targets: steps x{_f(g.get('steps_ratio'), '.2f')} (<= {TARGETS['steps']}: "
            f"{'yes' if m['steps'] else 'no'}), examples x{_f(g.get('examples_ratio'), '.2f')} "
            f"(<= {TARGETS['examples']}: {'yes' if m['examples'] else 'no'}), held-out x"
            f"{_f(g.get('heldout_ratio'), '.3f')} (<= {TARGETS['heldout']}: {'yes' if m['heldout'] else 'no'}), "
            f"frontier {_f(g.get('frontier_product'), '.2f')} (<= 1: {'yes' if m['frontier'] else 'no'})"
        )
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install 'noisescale[report]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    by_label = {r["label"]: r for r in res["rows"]}
    colors = {"fixed": "#444444", "linear_ramp": "#2ca02c", "gns": "#d62728"}
    for run in res["runs"]:
        row = by_label[run["label"]]
        if (
            run["steps"] is None
            or run["lr_mult"] != row["lr_mult"]
            or (run["label"] not in ("gns",) and row["schedule"] != "fixed")
        ):
            continue
        ax.scatter(run["examples"], run["steps"], s=10, alpha=0.35, color=colors[run["schedule"]])
    for r in res["rows"]:
        if r["steps"] is None:
            continue
        main = r["schedule"] != "gns" or r["label"] == "gns"
        ax.scatter(
            r["examples"],
            r["steps"],
            s=60 if main else 28,
            color=colors[r["schedule"]],
            marker="o" if r["schedule"] == "fixed" else ("D" if main else "x"),
            zorder=3,
        )
        ax.annotate(
            r["label"],
            (r["examples"], r["steps"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8 if main else 6,
            color="#222222" if main else "#aa4444",
        )
    fit = res["fit"]
    if fit:
        s_min, e_min = fit["S_min"], fit["E_min"]
        xs = [s_min * (1 + 10 ** (i / 50 - 2)) for i in range(200)]
        ax.plot(
            [e_min * (1 + 1 / (s / s_min - 1)) for s in xs],
            xs,
            color="#1f77b4",
            lw=1.2,
            label=f"fit: S_min {s_min:,.0f}, E_min {e_min:,.0f}, B_noise {fit['B_noise']:,.0f}",
        )
        ax.legend(loc="upper right", fontsize=8)
    fixed = [r for r in res["rows"] if r["steps"] is not None]
    if fixed:
        ax.set_xlim(0.8 * min(r["examples"] for r in fixed), 1.3 * max(r["examples"] for r in fixed))
        ax.set_ylim(0.8 * min(r["steps"] for r in fixed), 1.3 * max(r["steps"] for r in fixed))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to the target loss (E)")
    ax.set_ylabel("optimizer steps to the target loss (S)")
    ax.set_title(f"{res['workload']}: steps and examples to training loss {res['target_loss']:g} (median of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


QUICK = {
    "digits": {"target_loss": 0.1, "budget": 3_000, "max_examples": 12_000, "eval_examples": 256},
    "charlm": {"target_loss": 3.2, "budget": 1_000, "max_examples": 6_000, "eval_examples": 256},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default="digits,charlm", help="comma-separated: digits, charlm")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"gns variants (default all): {', '.join(VARIANTS)}")
    p.add_argument(
        "--seeds", default=None, help="N (seeds 0..N-1) or a comma-separated list (default: digits 8, charlm 3)"
    )
    p.add_argument("--grid", default="0.5,1,2", help="learning-rate multipliers of the fixed batches (default 0.5,1,2)")
    p.add_argument(
        "--adaptive-grid", default="1", help="learning-rate multipliers of the ramp and the controllers (default 1)"
    )
    p.add_argument("--batches", default=None, help="fixed batch sizes (default: the workload's sweep)")
    p.add_argument("--max-examples", type=int, default=None, help="give up on a run after this many examples")
    p.add_argument("--out", default="benchmarks/results/adaptive", help="folder for JSON, PNGs and runs/")
    p.add_argument("--no-runs", action="store_true", help="do not write run stores")
    p.add_argument("--quick", action="store_true", help="smoke test: easy targets, two batches, one seed, gns only")
    p.add_argument("--from-json", default=None, help="print the tables and draw the PNGs of a finished run's JSON")
    p.add_argument(
        "--append", action="store_true", help="add these runs to <out>/adaptive.json (e.g. other learning rates)"
    )
    p.add_argument("--skip-fixed", action="store_true", help="run only the ramp and the controllers")
    args = p.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        for res in doc["workloads"].values():
            print(table(analyse(build_rows(res) if "specs" in res else res)) + "\n")
            png = Path(args.from_json).with_name(f"adaptive_{res['workload']}.png")
            if plot(res, png):
                print(f"wrote {png}")
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    args.grid = [float(g) for g in args.grid.split(",")]
    args.adaptive_grid = [float(g) for g in args.adaptive_grid.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    workloads = []
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; known: {list(WORKLOADS)}")
        workloads.append(WORKLOADS[name])
    if args.seeds is not None:
        args.seeds = [int(s) for s in args.seeds.split(",")] if "," in args.seeds else list(range(int(args.seeds)))
        if not args.seeds:
            p.error("--seeds needs a number >= 1 or a list such as 0,1,2")
    if args.quick:
        args.seeds, args.grid, args.adaptive_grid, args.variants = [0], [1.0], [1.0], ["gns"]
        workloads = [replace(w, **QUICK[w.name], sweep=w.sweep[1:4:2]) for w in workloads]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = None if args.no_runs else out / "runs"
    if runs_dir is not None and runs_dir.exists() and not args.append:
        shutil.rmtree(runs_dir)  # one benchmark's runs at a time: the planner reads them all
    previous = json.loads((out / "adaptive.json").read_text()) if args.append else None
    doc: dict[str, Any] = {
        "settings": {
            "seeds": args.seeds,
            "grid": args.grid,
            "adaptive_grid": args.adaptive_grid,
            "variants": args.variants,
            "quick": args.quick,
            "gns": GNS,
            "variant_settings": {v: VARIANTS[v] for v in args.variants},
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
            "load_average": os.getloadavg(),
            "threads": 1,
        },
        "workloads": {},
    }
    start = time.time()
    if previous is not None:
        doc["workloads"] = previous["workloads"]
        doc["appended"] = previous.get("appended", []) + [doc["settings"]]
        doc["settings"] = previous["settings"]
    for w in workloads:
        res = run_workload(w, args, runs_dir)
        if previous is not None and w.name in previous["workloads"]:
            res = merge(previous["workloads"][w.name], res)
        res = analyse(build_rows(res))
        doc["workloads"][w.name] = res
        (out / "adaptive.json").write_text(json.dumps(doc, indent=1, default=str))
        print(table(res) + "\n", flush=True)
        png = out / f"adaptive_{w.name}.png"
        if plot(res, png):
            print(f"wrote {png}")
    doc["seconds"] = time.time() - start
    doc["machine"]["load_average_end"] = os.getloadavg()
    (out / "adaptive.json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out / 'adaptive.json'} ({doc['seconds'] / 60:.1f} min; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
