#!/usr/bin/env python3
"""What per-group statistics (``monitor.step(groups=ids)``) cost on top of the example source, on the CPU workloads.

Modes, timed interleaved on whole training steps like ``overhead.py`` (each trial runs a block of steps of every
mode in a fresh random order; a paired ratio is the median over trials of the ratio of two modes' block medians):

* ``plain``: no monitor;
* ``ns_example``: ``GNSMonitor(source="example")``, reading ``m.b_simple`` every step (``overhead.py``'s mode);
* ``ns_groups``: the same with ``groups=`` (``--groups`` sources, default 8, ids spread over the batch), reading
  one group's share every step too (which builds the groups' table);
* ``ns_groups_scores``: also ``example_ids=`` with ``score_every=1`` (a per-example score kept every step).

The target (issue 16): ``ns_groups`` costs at most 1.5 times what ``ns_example`` costs, i.e. the paired ratio of
their step times is at most 1.5.  The table also shows the ratio of the two modes' *overheads* over ``plain``.
Workloads whose layers have no Gram form (``torch_encoder``: ``nn.MultiheadAttention``) are reported as refused.

Usage::

    python benchmarks/sources_cost.py --quick
    python benchmarks/sources_cost.py --trials 15 --repeats 3

Writes ``--out`` (default ``benchmarks/results/sources_cost.json``) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch

from _modes import Mode, NsExampleMode, Skip
from _workloads import WORKLOADS, Workload
from overhead import time_modes

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "sources_cost.json"
TARGET = 1.5


class NsGroupsMode(NsExampleMode):
    """``ns_example`` with ``groups=`` every step; reads one group's share (the groups' table is built)."""

    name = "ns_groups"
    baseline = "ns_example"
    n_groups: ClassVar[int] = 8
    scores: ClassVar[bool] = False

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "score_every": 1}

    def setup(self) -> None:
        super().setup()
        from noisescale.errors import GroupsError

        b = self.wl.batch_size
        order = torch.randperm(b, generator=torch.Generator().manual_seed(0))
        self.groups = order % self.n_groups  # unequal-looking but balanced: every source in every step
        self.ids = torch.arange(b)
        self.error = GroupsError
        # One probe step: a model whose layers have no Gram form is refused here, not timed.
        x, y = self.wl.batches[0]
        for _ in range(2):
            self.model.zero_grad(set_to_none=True)
            self.backward(x, y)
            try:
                self.monitor.step(b, groups=self.groups)
            except GroupsError as e:
                raise Skip(f"refused: {str(e)[:200]}") from None

    def statistics(self, batch_size: int) -> None:
        kw: dict[str, Any] = {"groups": self.groups}
        if self.scores:
            kw["example_ids"] = self.ids
        m = self.monitor.step(batch_size, **kw)
        first = next(iter(m.groups.values()), None)
        self.last = (m.b_simple, first.share if first is not None else None)


class NsGroupsScoresMode(NsGroupsMode):
    name = "ns_groups_scores"
    scores = True


MODES: dict[str, type[Mode]] = {
    "plain": Mode,
    "ns_example": NsExampleMode,
    "ns_groups": NsGroupsMode,
    "ns_groups_scores": NsGroupsScoresMode,
}


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def measure(wl: Workload, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    state = wl.initial_state()
    modes: dict[str, Mode] = {}
    skipped: dict[str, str] = {}
    NsGroupsMode.n_groups = args.groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in MODES.items():
            try:
                modes[name] = cls(wl, state)
            except Skip as e:
                skipped[name] = str(e)
        timed = time_modes(wl, modes, args, random.Random(seed))
    for m in modes.values():
        m.close()
    out: dict[str, Any] = {"modes": timed, "skipped": skipped}
    med = {n: r["median_ms"] for n, r in timed.items()}
    if "ns_groups" in med:
        over_ex = med["ns_example"] - med["plain"]
        out["groups_over_example"] = timed["ns_groups"].get("paired_ratio")
        out["overhead_ratio"] = (med["ns_groups"] - med["plain"]) / over_ex if over_ex > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mlp_digits,tiny_transformer,tiny_llama,torch_encoder")
    p.add_argument("--groups", type=int, default=8, help="number of sources (default 8)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="independent interleaved runs per workload")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--block-s", dest="block_s", type=float, default=0.25)
    p.add_argument("--max-inner", dest="max_inner", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    p.add_argument("--quick", action="store_true", help="2 trials, 1 repeat, 2 workloads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.repeats, args.workloads = 2, 1, "mlp_digits,tiny_transformer"
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_average_before": os.getloadavg(),
        "started": time.time(),
        "workloads": {},
    }
    rows = []
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]()
        runs = [measure(wl, args, seed) for seed in range(args.repeats)]
        results["workloads"][name] = runs
        ratios = [r["groups_over_example"] for r in runs if r.get("groups_over_example") is not None]
        over = [r["overhead_ratio"] for r in runs if r.get("overhead_ratio") is not None]
        t = {n: statistics.median(r["modes"][n]["median_ms"] for r in runs) for n in runs[0]["modes"]}
        ex_plain = [r["modes"]["ns_example"]["paired_ratio"] for r in runs]
        scores = [
            r["modes"]["ns_groups_scores"]["median_ms"] / r["modes"]["ns_example"]["median_ms"]
            for r in runs
            if "ns_groups_scores" in r["modes"]
        ]
        rows.append((name, t, ex_plain, ratios, over, scores, runs[0]["skipped"]))
        print(f"{name}: done", file=sys.stderr)
    results["load_average_after"] = os.getloadavg()
    lines = [
        f"Per-group statistics ({args.groups} sources) against the example source; medians of {args.repeats} "
        f"interleaved runs of {args.trials} trials, {args.threads} torch thread(s); load average "
        f"{results['load_average_before'][0]:.1f} before, {results['load_average_after'][0]:.1f} after.",
        "",
        "| workload | plain ms | example ms (x plain) | groups ms | groups / example (each run) | overhead ratio "
        f"| groups+scores / example | target <= {TARGET} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t, ex_plain, ratios, over, scores, skipped in rows:
        if not ratios:
            why = skipped.get("ns_groups", "no ratio")
            lines.append(f"| {name} | {t.get('plain', float('nan')):.2f} | - | - | {why[:90]} | - | - | - |")
            continue
        ok = statistics.median(ratios) <= TARGET
        lines.append(
            f"| {name} | {t['plain']:.2f} | {t['ns_example']:.2f} ({statistics.median(ex_plain):.2f}) | "
            f"{t['ns_groups']:.2f} | {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) | "
            f"{statistics.median(over):.2f} | {statistics.median(scores):.2f} | {'yes' if ok else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
