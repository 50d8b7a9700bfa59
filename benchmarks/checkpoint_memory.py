#!/usr/bin/env python3
"""Peak tensor memory of a training step with activation checkpointing, with and without the ``example`` source.

A six-block residual MLP (LayerNorm, two Linear layers per block) on a (16, 32, 64) batch, float32, CPU.  For
no checkpointing, non-reentrant and reentrant ``torch.utils.checkpoint`` of every block, one warm-up step, then
the peak bytes of tensor storage alive at once during one step (``_memory.LiveTensorBytes``), plain and with
``GNSMonitor(model, source="example")``; the measured ``tr(Sigma)`` must agree across the three modes.  The
monitor keeps each layer's inputs for its backward hook; under checkpointing they must go through the
saved-tensor hooks, or every checkpointed activation stays alive.  Usage::

    python benchmarks/checkpoint_memory.py [--out benchmarks/results/checkpoint_memory.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import noisescale as ns
from _memory import LiveTensorBytes

HERE = Path(__file__).resolve().parent
MODES = ("none", "nonreentrant", "reentrant")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class Net(nn.Module):
    def __init__(self, mode: str, d: int = 64, n: int = 6) -> None:
        super().__init__()
        self.blocks, self.head, self.mode = nn.ModuleList(Block(d) for _ in range(n)), nn.Linear(d, 5), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if self.mode == "none" else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.head(x).mean(1)


def peak(mode: str, monitored: bool) -> tuple[float, float | None]:
    """``(peak MB, tr(Sigma) raw)`` of one step after a warm-up step."""
    torch.manual_seed(0)
    net = Net(mode)
    monitor = ns.GNSMonitor(net, source="example") if monitored else None
    gen = torch.Generator().manual_seed(1)
    # Reentrant checkpointing reaches the blocks' parameters only through an input that requires grad.
    x = torch.randn(16, 32, 64, generator=gen).requires_grad_()
    y = torch.randint(0, 5, (16,), generator=gen)
    trace = None
    for _ in range(2):  # a warm-up step, then the measured one
        net.zero_grad(set_to_none=True)
        with LiveTensorBytes() as mem:
            nn.functional.cross_entropy(net(x), y).backward()
        if monitor is not None:
            trace = monitor.step(batch_size=16).trace_cov_raw
    return mem.peak / 1e6, trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "checkpoint_memory.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = {}
    for mode in MODES:
        plain, _ = peak(mode, False)
        monitored, trace = peak(mode, True)
        rows[mode] = {"plain_mb": plain, "monitor_mb": monitored, "ratio": monitored / plain, "trace_cov_raw": trace}
    traces = [r["trace_cov_raw"] for r in rows.values()]
    agree = all(t is not None and abs(t - traces[0]) <= 1e-4 * abs(traces[0]) for t in traces)
    print("| checkpointing | plain step, peak MB | with the monitor, peak MB | ratio | tr(Sigma) raw |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['plain_mb']:.2f} | {r['monitor_mb']:.2f} | {r['ratio']:.2f} | {r['trace_cov_raw']:.6g} |")
    print(f"\ntr(Sigma) {'agrees' if agree else 'DOES NOT agree'} across the modes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows, "trace_agrees": agree}, indent=1))
    print(f"wrote {args.out}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
