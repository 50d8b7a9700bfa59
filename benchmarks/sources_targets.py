#!/usr/bin/env python3
"""The two quality targets of per-source noise and per-example scores (issue 16), over several seeds.

1. ``noisy_labels``: the default ``noisescale demo --noisy-labels 0.05`` run (digits MLP, 800 steps of 128): the
   precision of the flipped examples among the top 5% by score at the end (target >= 0.8).
2. ``two_sources``: the same MLP trained on two sources of digits, each half of the training set, the second with
   a fraction of its labels flipped (``--flip``, default 0.2); ``groups=`` names the source of each example.  At
   the end the noisier source's share of tr(Sigma) must be the larger one, with bands that do not overlap; its
   own B_simple and alignment are reported beside.  Each run is recorded under ``--runs`` (``noisescale show`` /
   ``data`` / ``report`` read them).

Usage::

    python benchmarks/sources_targets.py --seeds 0,1,2,3,4
    python benchmarks/sources_targets.py --only two_sources --steps 400

Writes ``--out`` (default ``benchmarks/results/sources_targets.json``) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "sources_targets.json"


def noisy_labels(seed: int, runs: Path, steps: int | None) -> dict[str, Any]:
    from noisescale.demo import DemoOptions, run_demo

    result = run_demo(DemoOptions(dir=str(runs), seed=seed, steps=steps, noisy_labels=0.05, progress=False))
    assert result.data is not None
    ln = result.data["label_noise"]
    return {"seed": seed, "precision": ln["precision"], "top": len(result.data["top"]), "path": str(result.path)}


def two_sources(seed: int, runs: Path, steps: int, flip: float) -> dict[str, Any]:
    import noisescale as ns
    from noisescale.demo.digits import N_TRAIN, make_digits_task
    from noisescale.demo.noisy import flip_labels
    from noisescale.demo.task import EpochSampler

    task = make_digits_task(seed=seed)
    # The task's own training set, through its sampler's view: rebuild it the way make_digits_task does.
    from noisescale.demo.digits import load_digits_tensors

    x, y = load_digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    x_train, y_train = x[perm[:N_TRAIN]], y[perm[:N_TRAIN]]
    source = (torch.arange(N_TRAIN) >= N_TRAIN // 2).long()  # source 1: the second half
    noisy_half, flipped = flip_labels(y_train[N_TRAIN // 2 :], flip, classes=10, seed=seed)
    y_train = torch.cat([y_train[: N_TRAIN // 2], noisy_half])
    sampler = EpochSampler(N_TRAIN, torch.Generator().manual_seed(seed + 1))
    torch.set_num_threads(1)
    config = {"benchmark": "sources_targets", "flip": flip, "seed": seed, "steps": steps, "batch_size": 128}
    with ns.Run("two-sources", dir=runs, config=config) as run:
        monitor = ns.GNSMonitor(task.model, source="example", run=run, score_every=4)
        for step in range(1, steps + 1):
            idx = sampler.next(128)
            loss = F.cross_entropy(task.model(x_train[idx]), y_train[idx])
            loss.backward()
            m = monitor.step(batch_size=128, groups=source[idx], example_ids=idx)
            run.log(step, {"loss": loss.detach()})
            task.optimizer.step()
            task.optimizer.zero_grad(set_to_none=True)
        monitor.close()
        path = run.path
    clean, noisy = m.groups[0], m.groups[1]
    separate = (
        noisy.share is not None
        and clean.share is not None
        and noisy.share_low is not None
        and clean.share_high is not None
        and noisy.share_low > clean.share_high
    )
    return {
        "seed": seed,
        "share": {
            "clean": [clean.share, clean.share_low, clean.share_high],
            "noisy": [noisy.share, noisy.share_low, noisy.share_high],
        },
        "b_simple": {"clean": clean.b_simple, "noisy": noisy.b_simple},
        "alignment": {"clean": clean.alignment, "noisy": noisy.alignment},
        "separate": separate,
        "flipped": len(flipped),
        "path": str(path),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--only", choices=("noisy_labels", "two_sources"), default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the demo's 800)")
    p.add_argument("--flip", type=float, default=0.2, help="two_sources: fraction of source 1's labels flipped")
    p.add_argument("--runs", type=Path, default=HERE / "results" / "sources_targets" / "runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.runs.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "load_average": os.getloadavg()}
    lines = []
    t0 = time.time()
    if args.only in (None, "noisy_labels"):
        res = [noisy_labels(s, args.runs, args.steps) for s in seeds]
        out["noisy_labels"] = res
        lines += [
            "noisy labels (5% of digits' training labels flipped; precision of flipped examples in the top 5%, "
            "target >= 0.8):",
            "",
            "| seed | precision | top |",
            "|---|---|---|",
            *(f"| {r['seed']} | {r['precision']:.3f} | {r['top']} |" for r in res),
            "",
        ]
    if args.only in (None, "two_sources"):
        res = [two_sources(s, args.runs, args.steps or 800, args.flip) for s in seeds]
        out["two_sources"] = res
        lines += [
            f"two sources (source 1 with {args.flip:.0%} of its labels flipped): share of tr(Sigma) [band] at the "
            "end; target: source 1's larger, bands apart",
            "",
            "| seed | clean share | noisy share | bands apart | B_simple clean / noisy | alignment clean / noisy |",
            "|---|---|---|---|---|---|",
        ]
        for r in res:
            c, n = r["share"]["clean"], r["share"]["noisy"]
            lines.append(
                f"| {r['seed']} | {c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}] | {n[0]:.3f} [{n[1]:.3f}, {n[2]:.3f}] | "
                f"{'yes' if r['separate'] else 'NO'} | {_f(r['b_simple']['clean'])} / {_f(r['b_simple']['noisy'])} | "
                f"{_f(r['alignment']['clean'])} / {_f(r['alignment']['noisy'])} |"
            )
    out["seconds"] = time.time() - t0
    out["load_average_after"] = os.getloadavg()
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


if __name__ == "__main__":
    sys.exit(main())
