#!/usr/bin/env python3
"""Overhead of noisescale's ``GNSMonitor`` on a training step, next to peer libraries, in one interleaved run.

For each workload (``_workloads.py``) every mode (``_modes.py``) is built from the same initial parameters and
timed on whole training steps (zero_grad, forward, backward, statistics, SGD step; statistics on every step).
Modes run interleaved: each trial runs a short block of steps of every mode, in a fresh random order, and a
mode's *paired ratio* is the median over trials of (its block median / its baseline's block median in the same
trial), which holds up on a shared, drifting CPU.  The baseline is ``plain`` for one-batch modes and
``plain_accum`` (the same ``N_MICRO`` micro-batches, no monitor) for ``ns_microbatch``.

Before timing, each mode does one backward pass on batch 0 at the initial parameters and is checked against
exact float64 per-example gradients from torch.func: per-example squared norms (noisescale's come from
``ExampleCollector(keep_per_example=True)``) and the one-step B_simple, both on the parameters the mode covers.
Peak memory is measured per mode in a fresh process (a fork-server child that has only imported modules), after
one warm-up step: exactly, as the most bytes of tensor storage alive at once during a few steps (``_memory``),
and, for reference, as the rise of peak RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
which the C allocator's caching blurs by several MB.

The ``ddp_mlp`` workload is the data-parallel row: ``ddp_overhead.measure`` at one global batch (``--ddp-batch``),
plain DDP against the ``rank`` source in two fresh gloo processes of one thread each (see that script).

Peers (BackPACK, Opacus, torch.func) are optional: a missing package skips its mode.  Usage::

    python benchmarks/overhead.py --quick                 # smoke test, about a minute
    python benchmarks/overhead.py                         # full run (see benchmarks/README.md)
    python benchmarks/overhead.py --profile ns_example    # where the monitor's time goes, on the MLP

Writes ``--out`` (JSON, default ``benchmarks/results/overhead.json``) and a Markdown table beside it (``.md``).
Exits 1 when a mode's norms or B_simple disagree with the exact reference; the overhead targets are reported,
not enforced.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import sys
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import ddp_overhead
from _memory import LiveTensorBytes
from _modes import LR, MODES, Mode, Skip
from _overhead_report import DDP_WORKLOAD, assess_targets, markdown
from _profile import profile
from _reference import B_SIMPLE_RTOL, NORM_RTOL, evaluate, exact_reference
from _workloads import N_BATCHES, N_MICRO, SEED, WORKLOADS, Workload

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "overhead.json"
DISTRIBUTIONS = ("numpy", "scikit-learn", "noisescale", "backpack-for-pytorch", "opacus")


# -- timing ----------------------------------------------------------------------------------------------------


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def time_modes(wl: Workload, modes: dict[str, Mode], args: argparse.Namespace, rng: random.Random) -> dict:
    """Interleaved timing; returns per mode the step-time quartiles and the paired ratio to its baseline."""
    names = list(modes)
    cursor = dict.fromkeys(names, 0)

    def run(name: str, steps: int) -> list[float]:
        mode, out = modes[name], []
        for _ in range(steps):
            x, y = wl.batches[cursor[name] % N_BATCHES]
            cursor[name] += 1
            t0 = time.perf_counter()
            mode.step(x, y)
            out.append(time.perf_counter() - t0)
        return out

    block = {}
    for n in names:
        warm = run(n, args.warmup)
        per_step = statistics.median(warm[1:] or warm)
        block[n] = max(1, min(args.max_inner, round(args.block_s / max(per_step, 1e-6))))
        period = modes[n].period  # a cadence's blocks are whole periods: each holds as many measured steps
        block[n] = period * max(1, round(block[n] / period))
    gc.collect()
    samples: dict[str, list[float]] = {n: [] for n in names}
    trial_medians: dict[str, list[float]] = {n: [] for n in names}
    trial_means: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.trials):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            ts = run(n, block[n])
            samples[n] += ts
            trial_medians[n].append(statistics.median(ts))
            trial_means[n].append(statistics.fmean(ts))

    out = {}
    for n in names:
        q1, med, q3 = _quartiles([t * 1e3 for t in samples[n]])
        res: dict[str, Any] = {
            "median_ms": med,
            "p25_ms": q1,
            "p75_ms": q3,
            "steps": len(samples[n]),
            "steps_per_trial": block[n],
            "baseline": modes[n].baseline,
        }
        base = modes[n].baseline
        if base in modes:
            paired = [a / b for a, b in zip(trial_medians[n], trial_medians[base])]
            p1, pm, p3 = _quartiles(paired)
            res.update(paired_ratio=pm, paired_p25=p1, paired_p75=p3)
            # Means count every step, the rare measured ones of a cadence included (a median would skip them).
            paired_mean = [a / b for a, b in zip(trial_means[n], trial_means[base])]
            m1, mm, m3 = _quartiles(paired_mean)
            res.update(
                paired_mean_ratio=mm,
                paired_mean_p25=m1,
                paired_mean_p75=m3,
                mean_ratio=statistics.fmean(samples[n]) / statistics.fmean(samples[base]),
            )
            if modes[n].period > 1:  # the cadence modes are compared by their means
                res.update(paired_ratio=mm, paired_p25=m1, paired_p75=m3, compared_by="mean")
        out[n] = res
    return out


# -- memory ----------------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no {key} in /proc/self/status")
    return int(m.group(1))


def _probe_child(wl_name: str, mode_name: str, steps: int, threads: int | None, conn: Connection) -> None:
    """In a fresh process that has only imported modules: the peak RSS rise over ``steps`` steps after a warm-up."""
    try:
        if threads:
            torch.set_num_threads(threads)
        wl = WORKLOADS[wl_name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mode = MODES[mode_name](wl, wl.initial_state())
            # One warm-up step first: what it loads once (kernel code pages, caches, lazily built indices) is not
            # the per-step working set that the memory target is about.
            mode.step(*wl.batches[N_BATCHES - 1])
            gc.collect()
            before = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            for i in range(steps):
                mode.step(*wl.batches[i % N_BATCHES])
            peak = _status_kb("VmHWM")
            with LiveTensorBytes() as live:
                for i in range(steps):
                    mode.step(*wl.batches[i % N_BATCHES])
            mode.close()
        conn.send(
            {
                "rss_before_mb": before / 1024,
                "peak_mb": peak / 1024,
                "peak_extra_mb": (peak - before) / 1024,
                "peak_tensor_mb": live.peak / 2**20,
            }
        )
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {str(e)[:300]}"})
    finally:
        conn.close()


def memory_probe(wl_name: str, mode_name: str, args: argparse.Namespace) -> dict:
    """Peak memory of one mode, measured in a fresh child of a fork server that imported torch and nothing else
    ran (so the probe pays no interpreter start-up, yet inherits no allocator or thread-pool state)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch"])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(wl_name, mode_name, args.memory_steps, args.threads, send))
    proc.start()
    send.close()
    try:
        if not recv.poll(300):
            return {"error": "memory probe gave no result within 300 s"}
        return recv.recv()
    except EOFError:
        return {"error": f"memory probe died (exit code {proc.exitcode})"}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# -- one workload ----------------------------------------------------------------------------------------------


def bench_workload(wl: Workload, names: list[str], args: argparse.Namespace, rng: random.Random) -> dict:
    state = wl.initial_state()
    x0, y0 = wl.batches[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's fallback for SDPA
        ref = exact_reference(wl, state, x0, y0)
    res: dict[str, Any] = {
        "description": wl.description,
        "n_params": sum(ref.numel.values()),
        "batch_size": wl.batch_size,
        "exact_b_simple": {
            "per_example": ref.b_simple(),
            "micro": ref.b_simple(estimator="micro"),
            "micro_b_small": wl.batch_size // N_MICRO,
        },
        "modes": {},
    }
    live: dict[str, Mode] = {}
    for name in names:
        cls = MODES[name]
        if cls.workloads is not None and wl.name not in cls.workloads:
            continue
        entry: dict[str, Any] = {"baseline": cls.baseline}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.manual_seed(SEED)
                mode = cls(wl, state)
                val = mode.validate(x0, y0)
            entry["status"] = "ok"
            entry["notes"] = mode.notes
            entry["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})
            if val is not None:
                entry["check"] = evaluate(val, ref)
            live[name] = mode
        except Skip as e:
            entry.update(status="skipped", reason=str(e))
        except Exception as e:
            entry.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}")
            entry["traceback"] = traceback.format_exc()[-2000:]
        entry["setup_s"] = time.perf_counter() - t0
        res["modes"][name] = entry
        print(f"[{wl.name}] {name}: {entry['status']} {entry.get('reason', '')[:140]}", flush=True)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, t in time_modes(wl, live, args, rng).items():
            res["modes"][name]["timing"] = t
    res["timing_s"] = time.perf_counter() - t0
    for mode in live.values():
        mode.close()
    if not args.no_memory:
        for name in live:
            res["modes"][name]["memory"] = memory_probe(wl.name, name, args)
    print(f"[{wl.name}] timed in {res['timing_s']:.0f} s", flush=True)
    return res


# -- the DDP row ----------------------------------------------------------------------------------------------


def run_ddp(args: argparse.Namespace) -> dict:
    """The DDP row: ``ddp_overhead.measure`` in two fresh processes, or the error that stopped it."""
    try:
        return {"status": "ok", **ddp_overhead.measure(args.ddp_batch, quick=args.quick)}
    except Exception as e:  # a failed row is reported, the rest of the run is kept
        traceback.print_exc()
        return {"status": "error", "reason": f"{type(e).__name__}: {e}", "config": {"batch": args.ddp_batch}}


def describe_machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# -- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    every = [*WORKLOADS, DDP_WORKLOAD]
    ap.add_argument("--workloads", default=",".join(every), help=f"comma list of {', '.join(every)}")
    ap.add_argument(
        "--ddp-batch", type=int, default=256, help=f"global batch of the {DDP_WORKLOAD} row (2 ranks; default 256)"
    )
    ap.add_argument(
        "--modes",
        default=None,
        help=f"comma list (default: all); the baselines they need are added. Modes: {', '.join(MODES)}",
    )
    ap.add_argument("--trials", type=int, default=40, help="interleaved trials per workload (default 40)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 trials, short blocks, 2 memory steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output; the Markdown table goes beside it")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before the trials")
    ap.add_argument("--block-s", type=float, default=0.1, help="seconds per mode per trial (sets the block size)")
    ap.add_argument("--max-inner", type=int, default=20, help="most steps per mode per trial")
    ap.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory probe")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument("--profile", metavar="MODE", help="profile MODE on the first workload instead of benchmarking")
    ap.add_argument("--profile-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.warmup, args.block_s, args.max_inner, args.memory_steps = 3, 2, 0.03, 5, 2
    return args


def selected_modes(spec: str | None) -> list[str]:
    wanted = list(MODES) if spec is None else [s for s in spec.split(",") if s]
    unknown = [n for n in wanted if n not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    need = set(wanted)
    for n in wanted:
        base = MODES[n].baseline
        while base is not None:
            need.add(base)
            base = MODES[base].baseline
    return [n for n in MODES if n in need]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wl_names = [w for w in args.workloads.split(",") if w]
    bad = [w for w in wl_names if w not in WORKLOADS and w != DDP_WORKLOAD]
    if bad:
        raise SystemExit(f"unknown workload(s) {bad}; choose from {[*WORKLOADS, DDP_WORKLOAD]}")
    with_ddp = DDP_WORKLOAD in wl_names
    wl_names = [w for w in wl_names if w != DDP_WORKLOAD]
    if args.profile:
        if not wl_names:
            raise SystemExit(f"--profile needs one of {list(WORKLOADS)} in --workloads")
        if args.profile not in MODES:
            raise SystemExit(f"unknown mode {args.profile!r}; choose from {list(MODES)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile(WORKLOADS[wl_names[0]](), args.profile, args.profile_steps)
        return 0

    names = selected_modes(args.modes)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "versions": versions(),
            "machine": describe_machine(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {
                "trials": args.trials,
                "warmup": args.warmup,
                "block_s": args.block_s,
                "max_inner": args.max_inner,
                "memory_steps": args.memory_steps,
                "torch_threads": torch.get_num_threads(),
                "quick": args.quick,
                "lr": LR,
                "optimizer": "SGD, no momentum",
                "n_micro": N_MICRO,
                "n_batches_cycled": N_BATCHES,
                "seed": SEED,
                "norm_rtol": NORM_RTOL,
                "b_simple_rtol": B_SIMPLE_RTOL,
            },
            "method": __doc__,
        },
        "workloads": {},
    }
    rng = random.Random(SEED)
    for wname in wl_names:
        results["workloads"][wname] = bench_workload(WORKLOADS[wname](), names, args, rng)
    if with_ddp:
        print(f"\n== {DDP_WORKLOAD}: plain DDP vs the rank source, 2 processes ==", flush=True)
        results["ddp"] = run_ddp(args)
    results["meta"]["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results["meta"]["total_s"] = time.perf_counter() - t_start
    results["targets"] = assess_targets(results)
    failures = [
        f"{w}/{n}: {msg}"
        for w, wr in results["workloads"].items()
        for n, m in wr["modes"].items()
        for msg in m.get("check", {}).get("failed_checks", [])
    ]
    results["failed_checks"] = failures
    table = markdown(results)
    results["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md').name}; total {results['meta']['total_s']:.0f} s")
    for f in failures:
        print(f"CHECK FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
