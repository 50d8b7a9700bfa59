#!/usr/bin/env python3
"""Load on ``noisescale dashboard``: a run of a million steps opening, and the API while a run is written fast.

Two measurements, each against the dashboard as users run it (``noisescale dashboard DIR`` in its own process,
reached over HTTP on 127.0.0.1):

* **open**: a finished run of ``--steps`` steps (default 1,000,000) with ``--layers`` per-layer rows each step,
  the loss and the learning rate, written once with the store's own schema (SQL, in one transaction) and kept under
  ``benchmarks/results/dashboard_load/`` for later runs.  Timed: the run endpoint's first answer (``GET
  /api/runs/{id}``: key numbers and config), the three series requests the page makes (in parallel, as the
  page does: the B_simple chart, the gradient chart, the other metrics; each downsampled server-side to 1000 points
  with every bucket's minimum and maximum), the heat map and the events; and the runs list.  The first open (files
  not yet in the page cache of the OS only if they were just written elsewhere) and the median of ``--repeats``.
* **live**: a writer process records a run with the store's own writer (``noisescale.store.Run``, its background
  thread and batched transactions) at ``--rate`` steps per second, each step one measurement, ``--layers`` layer
  rows and two metrics, for ``--seconds``; meanwhile one client reads what an open page reads (the stream of
  updates, the series again, the heat map, the runs list, the run's key numbers) as fast as it can.  Reported: the
  latency of each request (median, 95th percentile), the writer's rate achieved, and how late the rows reach the
  page through the server-sent events stream (wall time of arrival minus the row's own time; the writer commits
  every second, its default ``flush_interval``).

Targets (reported, not enforced): the run endpoint answers a 1M-step run in under 2 s; the median API latency is
under 200 ms while the writer appends thousands of rows per second.  Timings are noisy on a shared machine: the
load average is recorded at the start and the end.  Usage::

    python benchmarks/dashboard_load.py [--steps 1000000] [--layers 4] [--rate 2000] [--seconds 20]
        [--repeats 5] [--out benchmarks/results/dashboard_load.json] [--fresh]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import http.client
import json
import math
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "dashboard_load.json"
BIG_DIR = HERE / "results" / "dashboard_load" / "big"
LIVE_DIR = HERE / "results" / "dashboard_load" / "live"
NOISE = "b_simple,b_simple_low,b_simple_high,batch_size"
GRAD = "grad_sq,trace_cov"
OPEN_TARGET_S = 2.0
LATENCY_TARGET_S = 0.2


# -- the big run -----------------------------------------------------------------------------------------------


def write_big_run(path: Path, steps: int, layers: int, seed: int = 0) -> float:
    """A finished run of ``steps`` steps in the store's schema; returns the seconds it took to write."""
    from noisescale.store.schema import apply_migrations
    from noisescale.types import COLUMNS

    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    apply_migrations(conn)
    start = time.time() - steps * 0.05
    config = {"workload": "synthetic", "steps": steps, "layers": layers, "seed": seed}
    conn.execute(
        "INSERT INTO run VALUES ('20250101-000000-b16b16', 'big', ?, ?, ?, 'finished', ?, '0.1.0', 'bench', 0)",
        (start, start + steps * 0.05, start + steps * 0.05, json.dumps(config)),
    )
    rng = random.Random(seed)

    def measurement_rows():
        b = 50.0
        for s in range(1, steps + 1):
            b = max(5.0, b * math.exp(rng.gauss(2e-6, 0.01)))
            raw = b * rng.lognormvariate(0, 0.5) * (50 if rng.random() < 1e-5 else 1)  # a few spikes
            g = 1.0 / (1 + s / 1e4)
            vals = (b, 0.8 * b, 1.25 * b, raw, g, b * g, g * rng.uniform(0.5, 1.5), raw * g)
            batch = 64 * 2 ** min(4, s // 200_000)
            yield (s, 64 * s, start + s * 0.05, batch, "example", 1.0, "ok", 0, *vals)

    placeholders = ", ".join("?" * (8 + len(COLUMNS)))
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO measurements VALUES ({placeholders})", measurement_rows())
    for key, fn in (("loss", lambda s: 3.0 / math.sqrt(1 + s / 1000) + rng.gauss(0, 0.05)), ("lr", lambda s: 0.1)):
        conn.executemany(
            "INSERT INTO metrics (key, step, examples, wall_time, value) VALUES (?, ?, ?, ?, ?)",
            ((key, s, 64 * s, start + s * 0.05, fn(s)) for s in range(1, steps + 1)),
        )
    for layer in range(layers):
        conn.execute("INSERT INTO layers (kind, name) VALUES ('param', ?)", (f"blocks.{layer}.weight",))
        base = 10.0 * (layer + 1)
        conn.executemany(
            f"INSERT INTO layer_measurements VALUES (?, ?, {', '.join('?' * len(COLUMNS))})",
            (
                (layer + 1, s, v, 0.8 * v, 1.25 * v, v, 1.0, v, 1.0, v)
                for s in range(1, steps + 1)
                for v in (base * (1 + 0.5 * math.sin(s / 5e4 + layer)),)
            ),
        )
    for i, step in enumerate(range(steps // 10, steps, steps // 10)):
        state = "firing" if i % 2 == 0 else "resolved"
        data = {"rule": "batch_below_noise", "state": state, "severity": "warning", "action": "raise the batch",
                "value": 100.0, "layer": None}  # fmt: skip
        conn.execute(
            "INSERT INTO events (step, examples, wall_time, kind, message, data) VALUES (?, ?, ?, 'alert', ?, ?)",
            (step, 64 * step, start + step * 0.05, f"alert {i}", json.dumps(data)),
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    tmp.rename(path)
    return time.perf_counter() - t0


# -- the writer process ----------------------------------------------------------------------------------------


class _FakeMeasurement:
    """What ``Run`` needs from a measurement: ``to_dict(per_layer=True)`` (called on the writer's thread)."""

    def __init__(self, step: int, batch: int, layers: int, rng: random.Random) -> None:
        from noisescale.types import COLUMNS

        b = 100 * rng.lognormvariate(0, 0.3)
        vals = dict(zip(COLUMNS, (b, 0.8 * b, 1.25 * b, b, 1.0, b, 1.0, b)))
        self._d = {
            "step": step, "examples": step * batch, "batch_size": batch, "source": "example", "coverage": 1.0,
            "status": "ok", "skipped_steps": 0, **vals,
            "layers": {f"blocks.{i}.weight": vals for i in range(layers)}, "modules": {},
        }  # fmt: skip

    def to_dict(self, per_layer: bool = True) -> dict[str, Any]:
        return self._d


def writer_main(dir: str, rate: float, seconds: float, layers: int) -> None:
    from noisescale.store import Run

    rng = random.Random(1)
    with Run("live", dir=dir, config={"rate": rate, "layers": layers}) as run:
        print(run.path, flush=True)
        t0 = time.perf_counter()
        step = 0
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(elapsed * rate)
            while step < due:
                step += 1
                run.log_measurement(_FakeMeasurement(step, 64, layers, rng))
                run.log(step, {"loss": 1.0 / math.sqrt(step), "lr": 0.1})
            time.sleep(0.002)
        run.flush()
        print(json.dumps({"steps": step, "seconds": time.perf_counter() - t0}), flush=True)


# -- HTTP ------------------------------------------------------------------------------------------------------


def get(port: int, path: str, params: dict[str, Any] | None = None) -> tuple[int, float, bytes]:
    target = path + ("?" + urllib.parse.urlencode(params) if params else "")
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    return resp.status, time.perf_counter() - t0, body


def start_server(dir: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "noisescale", "dashboard", str(dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the dashboard did not start: {line!r}")
    port = int(match.group(1))
    for _ in range(200):
        try:
            get(port, "/api/openapi.json")
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "median_ms": 1e3 * statistics.median(xs),
        "p95_ms": 1e3 * xs[min(len(xs) - 1, int(0.95 * len(xs)))],
        "max_ms": 1e3 * xs[-1],
    }


# -- open ------------------------------------------------------------------------------------------------------


def bench_open(port: int, run_id: str, repeats: int, metrics: list[str]) -> dict[str, Any]:
    base = f"/api/runs/{run_id}"
    rest = ",".join(m for m in metrics if m != "lr")
    page_series = [
        (base + "/series", {"columns": NOISE, "metrics": "", "points": 1000}),
        (base + "/series", {"columns": GRAD, "metrics": "lr", "points": 1000}),
        (base + "/series", {"columns": "", "metrics": rest, "points": 1000}),
    ]
    rounds = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(repeats):
            r: dict[str, float] = {}
            t0 = time.perf_counter()
            status, r["run"], body = get(port, base)
            assert status == 200, body[:300]
            t1 = time.perf_counter()
            answers = list(pool.map(lambda a: get(port, *a), page_series))
            assert all(a[0] == 200 for a in answers), [a[2][:200] for a in answers if a[0] != 200]
            r["series_parallel"] = time.perf_counter() - t1
            for i, a in enumerate(answers):
                r[f"series_{i}"] = a[1]
            r["charts_ready"] = time.perf_counter() - t0
            status, r["layers"], body = get(port, base + "/layers", {"points": 200})
            assert status == 200, body[:300]
            status, r["events"], _ = get(port, base + "/events", {"limit": 10000})
            r["page_ready"] = time.perf_counter() - t0
            status, r["runs_list"], _ = get(port, "/api/runs")
            doc = json.loads(answers[0][2])
            r["points"] = len(doc["measurements"]["step"])
            r["rows"] = doc["measurements"]["rows"]
            rounds.append(r)
    keys = [k for k in rounds[0] if k not in ("points", "rows")]
    return {
        "first_s": {k: rounds[0][k] for k in keys},
        "median_s": {k: statistics.median(r[k] for r in rounds) for k in keys},
        "points": rounds[0]["points"],
        "rows": rounds[0]["rows"],
    }


# -- live ------------------------------------------------------------------------------------------------------


def bench_live(port: int, dir: Path, rate: float, seconds: float, layers: int) -> dict[str, Any]:
    writer = subprocess.Popen(
        [sys.executable, __file__, "--role", "writer", "--dir", str(dir), "--rate", str(rate),
         "--seconds", str(seconds), "--layers", str(layers)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout is not None
    run_id = Path(writer.stdout.readline().strip()).stem
    latencies: dict[str, list[float]] = {}
    lags: list[float] = []
    errors: list[str] = []
    resets: list[float] = []

    def stream(cursor: dict[str, int]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=seconds + 60)
        conn.request("GET", f"/api/runs/{run_id}/stream?" + urllib.parse.urlencode({**cursor, "interval": 0.5}))
        resp = conn.getresponse()
        event = ""
        while True:
            line = resp.readline()
            if not line:
                break
            text = line.decode().rstrip("\n")
            if text.startswith("event:"):
                event = text[6:].strip()
            elif text.startswith("data:") and event == "update":
                doc = json.loads(text[5:])
                if doc["reset"]:
                    resets.append(time.time())  # more than 20000 new rows at once: the page reads the series again
                wall = doc["measurements"]["wall_time"]
                if wall:
                    lags.append(time.time() - wall[-1])
            elif event == "end":
                break
        conn.close()

    def timed(name: str, path: str, params: dict[str, Any] | None = None) -> bytes:
        status, dt, body = get(port, path, params)
        if status != 200:
            errors.append(f"{name}: {status} {body[:200]!r}")
        latencies.setdefault(name, []).append(dt)
        return body

    time.sleep(1.5)  # the first commit
    base = f"/api/runs/{run_id}"
    # As the page does: read the series, then follow the stream from their cursor.
    first = timed("series (B_simple chart)", base + "/series", {"columns": NOISE, "metrics": ""})
    cursor = json.loads(first)["cursor"]
    t_stream = threading.Thread(target=stream, args=(dict(cursor),), daemon=True)
    t_stream.start()
    t0 = time.perf_counter()
    while writer.poll() is None:
        doc = json.loads(timed("updates", base + "/updates", cursor))
        cursor = doc["cursor"]
        timed("series (B_simple chart)", base + "/series", {"columns": NOISE, "metrics": ""})
        timed("series (gradients chart, lr)", base + "/series", {"columns": GRAD, "metrics": "lr"})
        timed("layers", base + "/layers", {"points": 200})
        timed("run", base)
        timed("runs list", "/api/runs")
    loop_s = time.perf_counter() - t0
    tail = writer.stdout.read().strip().splitlines()
    writer.wait()
    t_stream.join(timeout=30)
    written = json.loads(tail[-1]) if tail else {"steps": 0, "seconds": 1}
    everything = [x for xs in latencies.values() for x in xs]
    return {
        "run_id": run_id,
        "writer": {
            "steps": written["steps"],
            "steps_per_s": written["steps"] / written["seconds"],
            "rows_per_s": written["steps"] * (1 + layers + 2) / written["seconds"],
        },
        "requests": {k: _stats(v) for k, v in latencies.items()},
        "all_requests": _stats(everything),
        "requests_per_s": len(everything) / loop_s,
        "stream_lag_s": {"median": statistics.median(lags), "max": max(lags), "updates": len(lags)} if lags else None,
        "stream_resets": len(resets),
        "errors": errors[:10],
    }


# -- report ----------------------------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    o, live, meta = res["open"], res["live"], res["meta"]
    lines = [
        f"dashboard load ({meta['date']}, load average {meta['loadavg_start']} -> {meta['loadavg_end']})",
        "",
        f"open: a finished run of {meta['steps']:,} steps, {meta['layers']} layers "
        f"({meta['big_mb']:.0f} MB; {o['rows']:,} rows drawn as {o['points']:,} points)",
        "",
        "| request | first open (s) | again, median (s) |",
        "|---|---:|---:|",
    ]
    names = {
        "run": "run endpoint (key numbers, config)",
        "series_parallel": "3 series requests in parallel (the charts)",
        "series_0": "  B_simple, band, batch size",
        "series_1": "  |G|^2, tr(Sigma), lr",
        "series_2": "  loss (other metrics)",
        "charts_ready": "run + charts",
        "layers": "heat map",
        "events": "events",
        "page_ready": "whole page",
        "runs_list": "runs list",
    }
    for k, label in names.items():
        lines.append(f"| {label} | {o['first_s'][k]:.3f} | {o['median_s'][k]:.3f} |")
    w = live["writer"]
    lines += [
        "",
        f"live: a writer at {w['steps_per_s']:,.0f} steps/s ({w['rows_per_s']:,.0f} rows/s, {w['steps']:,} steps) "
        f"while one client reads ({live['requests_per_s']:.1f} requests/s)",
        "",
        "| request | n | median (ms) | p95 (ms) | max (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, s in [*live["requests"].items(), ("all", live["all_requests"])]:
        lines.append(f"| {k} | {s['n']} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | {s['max_ms']:.1f} |")
    if live["stream_lag_s"]:
        lag = live["stream_lag_s"]
        lines.append(
            f"\nstream: {lag['updates']} updates, rows on the page {lag['median']:.2f} s (median) after they were "
            f"logged, {lag['max']:.2f} s at most (the writer commits every 1 s); {live['stream_resets']} reset(s) "
            "(more than 20000 new rows in one look: the page reads the series again)"
        )
    if live["errors"]:
        lines.append("\nerrors: " + "; ".join(live["errors"]))
    lines += ["", "targets (reported, not enforced):", *(f"- {t}" for t in res["targets"])]
    return "\n".join(lines)


def assess(res: dict[str, Any]) -> list[str]:
    o, live = res["open"], res["live"]
    first = o["first_s"]["run"]
    med = live["all_requests"]["median_ms"] / 1e3
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    return [
        f"{ok(first < OPEN_TARGET_S)}: the {res['meta']['steps']:,}-step run's endpoint answers in {first:.3f} s "
        f"(< {OPEN_TARGET_S} s); its charts' data in {o['first_s']['charts_ready']:.3f} s, the whole page in "
        f"{o['first_s']['page_ready']:.3f} s",
        f"{ok(med < LATENCY_TARGET_S)}: median API latency {1e3 * med:.1f} ms (< {1e3 * LATENCY_TARGET_S:.0f} ms) "
        f"while the writer appends {live['writer']['rows_per_s']:,.0f} rows/s",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rate", type=float, default=2000.0, help="steps per second written in the live phase")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the live phase")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="write the big run again even if it is there")
    p.add_argument("--role", choices=("bench", "writer"), default="bench", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "writer":
        writer_main(args.dir, args.rate, args.seconds, args.layers)
        return 0
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "steps": args.steps,
        "layers": args.layers,
        "rate": args.rate,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
    }
    big = BIG_DIR / f"big-{args.steps}-{args.layers}-20250101-000000-b16b16.sqlite"
    if args.fresh or not big.exists():
        shutil.rmtree(BIG_DIR, ignore_errors=True)
        print(f"writing a run of {args.steps:,} steps to {big} ...", flush=True)
        meta["big_write_s"] = write_big_run(big, args.steps, args.layers)
    meta["big_mb"] = big.stat().st_size / 1e6
    proc, port = start_server(BIG_DIR)
    try:
        print("opening it through the dashboard ...", flush=True)
        open_res = bench_open(port, big.stem, args.repeats, ["loss", "lr"])
    finally:
        proc.terminate()
        proc.wait()
    shutil.rmtree(LIVE_DIR, ignore_errors=True)
    LIVE_DIR.mkdir(parents=True)
    proc, port = start_server(LIVE_DIR)
    try:
        print(f"reading a run written at {args.rate:,.0f} steps/s for {args.seconds:.0f} s ...", flush=True)
        live_res = bench_live(port, LIVE_DIR, args.rate, args.seconds, args.layers)
    finally:
        proc.terminate()
        proc.wait()
    meta["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res: dict[str, Any] = {"meta": meta, "open": open_res, "live": live_res}
    res["targets"] = assess(res)
    table = markdown(res)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
