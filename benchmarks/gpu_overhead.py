#!/usr/bin/env python3
"""What the monitor costs a training step on a CUDA GPU, and a check that its hot path never waits for the GPU.

Workloads (causal transformers of ``_workloads.TinyGPT``, random tokens, AdamW, bf16 autocast or float32):

* ``tiny``: the CPU benchmark's transformer (d=128, 2 blocks, context 64, vocabulary 96), batch 32;
* ``gpt``: d=768, 12 heads, 6 blocks, context 256, vocabulary 8192, batch 16 (about 50 M parameters).

Modes, interleaved in one run: ``plain``; ``ns_example`` (``GNSMonitor(source="example")``, ``monitor.step``
every step, nothing read back); ``plain_accum`` and ``ns_microbatch`` (4 micro-batches).  Each trial runs a
block of steps of every mode in a fresh random order, timed with ``torch.cuda.synchronize`` around the block;
the *paired ratio* is the median over trials of a mode's block time over its baseline's.

Before timing, every ``ns_*`` mode runs a few steps under ``torch.cuda.set_sync_debug_mode("error")``: any
host-device synchronisation inside the hooks or ``monitor.step()`` raises there.  Reading a measurement syncs
once, on purpose, outside that check.

    python benchmarks/gpu_overhead.py                  # needs a CUDA device
    python benchmarks/gpu_overhead.py --quick

Writes ``--out`` (JSON, default ``benchmarks/results/gpu_overhead.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
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

WORKLOADS: dict[str, dict[str, int]] = {
    "tiny": {"vocab": 96, "ctx": 64, "d": 128, "heads": 4, "n_layer": 2, "batch": 32},
    "gpt": {"vocab": 8192, "ctx": 256, "d": 768, "heads": 12, "n_layer": 6, "batch": 16},
}
MODES = {"plain": None, "ns_example": "plain", "plain_accum": None, "ns_microbatch": "plain_accum"}
N_MICRO = 4


def _build(
    cfg: dict[str, int], device: torch.device, seed: int
) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    base = TinyGPT(vocab=cfg["vocab"], ctx=cfg["ctx"], d=cfg["d"], heads=cfg["heads"], n_layer=cfg["n_layer"])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["ctx"] + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)))
    runs: dict[str, Any] = {}
    for name in MODES:
        model = TinyGPT(vocab=cfg["vocab"], ctx=cfg["ctx"], d=cfg["d"], heads=cfg["heads"], n_layer=cfg["n_layer"])
        model.load_state_dict(state)
        model.to(device)
        monitor = None
        if name == "ns_example":
            monitor = ns.GNSMonitor(model, source="example")
        elif name == "ns_microbatch":
            monitor = ns.GNSMonitor(model, source="microbatch")
        runs[name] = {
            "model": model,
            "opt": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "monitor": monitor,
            "micro": N_MICRO if "accum" in name or "micro" in name else 1,
        }
    return runs, batches


def _step(run: dict[str, Any], x: torch.Tensor, y: torch.Tensor, amp: bool, check: bool = False) -> Any:
    """One training step; with ``check``, any host-device sync in forward, backward or ``monitor.step`` raises."""
    model, opt, monitor, k = run["model"], run["opt"], run["monitor"], run["micro"]
    opt.zero_grad(set_to_none=True)
    if check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for xm, ym in zip(x.chunk(k), y.chunk(k), strict=True):
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                logits = model(xm)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ym.flatten()) / k
            loss.backward()
        m = monitor.step(batch_size=x.shape[0]) if monitor is not None else None
    finally:
        if check:
            torch.cuda.set_sync_debug_mode("default")
    opt.step()  # the optimizer's own behaviour is not the monitor's business
    return m


def _bench(name: str, cfg: dict[str, int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    runs, batches = _build(cfg, device, args.seed)
    # No host sync in the hot path: any synchronisation inside the hooks or step() raises here.
    for run in runs.values():
        for i in range(3):
            _step(run, *batches[i % len(batches)], args.amp)  # warm-up: lazy state, cuBLAS handles, caches
        if run["monitor"] is not None:
            torch.cuda.synchronize()
            for i in range(3):
                m = _step(run, *batches[i % len(batches)], args.amp, check=True)
            run["last"] = m.b_simple  # one read, one sync, outside the check
    rng = random.Random(args.seed)
    blocks: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(args.trials):
        order = list(runs)
        rng.shuffle(order)
        for mode in order:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                _step(runs[mode], *batches[i % len(batches)], args.amp)
            torch.cuda.synchronize()
            blocks[mode].append((time.perf_counter() - t0) / args.steps)
    out: dict[str, Any] = {"config": cfg, "params": sum(p.numel() for p in runs["plain"]["model"].parameters())}
    for mode, base in MODES.items():
        row: dict[str, Any] = {"median_ms": 1e3 * statistics.median(blocks[mode])}
        if base is not None:
            ratios = sorted(a / b for a, b in zip(blocks[mode], blocks[base], strict=True))
            row["paired_ratio"] = statistics.median(ratios)
            row["q1"], row["q3"] = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            row["b_simple_last"] = runs[mode].get("last")
            row["coverage"] = runs[mode]["monitor"].coverage
        out[mode] = row
    for run in runs.values():
        if run["monitor"] is not None:
            run["monitor"].close()
    return out


def _half_precision_check(device: torch.device) -> dict[str, float]:
    """Largest relative error of the bf16 rule path (products of bf16, float32 sums) against float64 maths on the
    same bf16 values, for both Linear forms; it should be float32 rounding, about 1e-6."""
    from noisescale.collectors.rules.linear import sequence_linear_sq_norms

    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for form, (t, m, n) in {"ghost": (64, 256, 512), "materialised": (256, 64, 96)}.items():
        x = torch.randn(8, t, m, device=device, generator=gen).to(torch.bfloat16)
        g = torch.randn(8, t, n, device=device, generator=gen).to(torch.bfloat16)
        weight, bias = sequence_linear_sq_norms(x, g, with_bias=True)
        xd, gd = x.double(), g.double()
        want_w = torch.einsum("btn,btm->bnm", gd, xd).square().sum((1, 2))
        want_b = gd.sum(1).square().sum(1)
        assert bias is not None
        err = max(
            float(((weight.double() - want_w) / want_w).abs().max()),
            float(((bias.double() - want_b) / want_b).abs().max()),
        )
        out[form] = err
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--steps", type=int, default=10, help="steps per mode and trial")
    p.add_argument("--fp32", dest="amp", action="store_false", help="float32 instead of bf16 autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 3 trials of 3 steps")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_overhead.json")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.steps = 3, 3
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {
        "benchmark": "gpu_overhead",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "amp_bf16": args.amp,
        "trials": args.trials,
        "steps": args.steps,
        "workloads": {},
    }
    print(f"{results['device']}, torch {torch.__version__}, {'bf16 autocast' if args.amp else 'float32'}")
    results["bf16_rule_max_rel_err"] = _half_precision_check(device)
    print(f"bf16 Linear rule vs float64 on the same values, largest relative error: {results['bf16_rule_max_rel_err']}")
    print("| workload | params | plain ms | ns_example x (q1-q3) | plain_accum ms | ns_microbatch x (q1-q3) |", end="")
    print(" coverage |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        r = _bench(name, WORKLOADS[name], args, device)
        results["workloads"][name] = r
        ex, mb = r["ns_example"], r["ns_microbatch"]
        print(
            f"| {name} | {r['params'] / 1e6:.1f} M | {r['plain']['median_ms']:.2f} | "
            f"{ex['paired_ratio']:.3f} ({ex['q1']:.3f}-{ex['q3']:.3f}) | {r['plain_accum']['median_ms']:.2f} | "
            f"{mb['paired_ratio']:.3f} ({mb['q1']:.3f}-{mb['q3']:.3f}) | {ex['coverage']:.1%} |"
        )
    print("no host-device synchronisation inside the hooks or monitor.step() (checked with sync debug mode 'error')")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
