#!/usr/bin/env python3
"""How long the ``noisescale`` command takes to start, per subcommand, as a user runs it (a fresh process each).

Target: ``--help``, ``runs`` and ``show`` under 0.5 s on this project's 2-core machine.  The commands that only
read runs import no torch (``tests/unit/test_cli_startup.py`` checks that); this script measures the wall time of
the whole process, from its start to its exit, on a run written by the default digits demo (800 steps), and
counts the modules each command imported (``python -X importtime``).  ``demo --help`` and ``report`` are timed
too; the demo itself trains a model and is not a start-up.

Usage::

    python benchmarks/cli_startup.py [--repeats 10] [--run PATH] [--out benchmarks/results/cli_startup.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_S = 0.5
TARGETED = ("--help", "runs", "show")


def _command() -> list[str]:
    """The installed ``noisescale`` script beside this Python, else ``python -m noisescale``."""
    script = Path(sys.executable).with_name("noisescale")
    return [str(script)] if script.exists() else [sys.executable, "-m", "noisescale"]


def _imports(argv: list[str], cwd: Path) -> list[str]:
    """The top-level packages a command imported (from ``-X importtime``, which prints one line per module)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "noisescale", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                names.add(name.split(".")[0])
    return sorted(names)


def _time(argv: list[str], cwd: Path, repeats: int) -> list[float]:
    base = _command()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([*base, *argv], cwd=cwd, capture_output=True, text=True, check=False)
        out.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"`noisescale {' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="processes per command (default: 10)")
    ap.add_argument("--run", type=Path, default=None, help="a run file to read (default: a fresh digits demo run)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cli_startup.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "runs").mkdir()
        if args.run is None:
            print("recording a run with `noisescale demo -q` (about half a minute) ...", flush=True)
            done = subprocess.run([*_command(), "demo", "-q"], cwd=cwd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"`noisescale demo -q` failed: {done.stderr.strip()}")
            run = Path(done.stdout.strip().splitlines()[-1])
        else:
            run = cwd / "runs" / args.run.name
            shutil.copy(args.run, run)
        commands = {
            "--help": ["--help"],
            "--version": ["--version"],
            "runs": ["runs"],
            "show": ["show", str(run)],
            "show --json": ["show", str(run), "--json"],
            "report": ["report", str(run), "-o", "report.html"],
            "demo --help": ["demo", "--help"],
        }
        load_start = os.getloadavg()
        _time(["--version"], cwd, 2)  # warm the file cache
        rows: dict[str, Any] = {}
        for name, cmd in commands.items():
            times = _time(cmd, cwd, args.repeats)
            heavy = [m for m in _imports(cmd, cwd) if m in ("torch", "numpy", "matplotlib", "sklearn")]
            rows[name] = {
                "argv": cmd,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "heavy_imports": heavy,
                "target_s": TARGET_S if name in TARGETED else None,
            }
        load_end = os.getloadavg()

    print(
        f"noisescale start-up, {args.repeats} processes per command; load average {load_start[0]:.2f} -> "
        f"{load_end[0]:.2f}"
    )
    print("| command | median s | min s | max s | imports torch | target |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        target = (
            "-" if r["target_s"] is None else f"< {r['target_s']} s: {'met' if r['median_s'] < TARGET_S else 'MISSED'}"
        )
        torch_ = "yes" if "torch" in r["heavy_imports"] else "no"
        print(f"| `{name}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {torch_} | {target} |")
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "repeats": args.repeats,
        "commands": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0  # the target is reported, not enforced: timings on a shared machine are noisy


if __name__ == "__main__":
    sys.exit(main())
