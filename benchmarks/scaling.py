#!/usr/bin/env python3
"""How the monitor's cost scales with the shapes: the law behind the overhead, measured beside its prediction.

Exact per-example norms of a Linear layer on sequences cost ``min(T (d_in + d_out), d_in d_out)`` multiply-adds
per token (the Gram form, or the materialised gradient), against ``3 d_in d_out`` for the layer's own forward and
backward, so the overhead of the ``example`` source is a function of ``T / d`` alone for a fixed architecture: it
peaks near ``T = d``.  A sketch of ``k`` projections costs ``k (d_in + d_out)`` per token where it is taken (at most
half the exact form), so its overhead falls as ``k / d``.  This script measures the ratio of a monitored step to a
plain one for each source and mode over a grid of shapes, and writes it beside the multiply-add prediction:

* ``grid``: one-block causal transformers (``_workloads.TinyGPT``, 4 heads, MLP 4x) at ``d`` in {128, 256, 512}
  and ``T`` in {64, 256, 1024}, ``--tokens`` tokens per batch (4096: batch 64, 16, 4);
* ``mlp``: the 64-w-w-10 MLP over widths ``w`` (2-D inputs: the exact form is linear in the width);
* ``cnn``: the digits CNN of ``overhead.py``; ``unet``: a small U-Net denoiser (``_workloads.TinyUNet``);
* ``llm`` (only when asked): the peak tensor memory of one Llama-7B MLP projection (4096 -> 11008) on 2 x 4096 tokens,
  plain, measured exactly, and with the buffers unbounded, to show what the chunked forms keep.

Modes (``_modes.py``): ``plain``; ``ns_example`` (exact); ``ns_sketch64``; ``plain_accum`` and ``ns_microbatch``
(4 micro-batches); any other mode of ``_modes.MODES`` by ``--modes``.  Timing is ``overhead.time_modes``: interleaved
blocks in a fresh order each trial, paired ratios to the baseline.  Peak memory is the most bytes of tensor storage
alive at once during one step after warm-up (``_memory.LiveTensorBytes``), over the plain step's.

    python benchmarks/scaling.py --quick                              # d=128, T in {64, 256}, a few trials
    python benchmarks/scaling.py                                      # the full grid (long on a 2-core CPU)
    python benchmarks/scaling.py --parts grid --d 256,512 --t 256,1024 --threads 1
    python benchmarks/scaling.py --parts llm                          # the memory bound at an LLM shape

Writes ``--out`` (JSON, default ``benchmarks/results/scaling.json``; rewritten after each workload, so a partial run
keeps what it measured), a Markdown table beside it (``.md``) and the plot (``.png``, needs matplotlib: the
``bench`` extra): ratio against ``T / d`` for the grid, measured points beside the predicted curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from _memory import LiveTensorBytes  # noqa: E402
from _modes import MODES, Mode, Skip  # noqa: E402
from _workloads import (  # noqa: E402
    N_BATCHES,
    SEED,
    TinyGPT,
    Workload,
    cnn_digits,
    unet_denoiser,
)
from noisescale.collectors.rules import linear_forms  # noqa: E402
from noisescale.collectors.rules.sketch import PAYS  # noqa: E402
from overhead import time_modes  # noqa: E402

DEFAULT_OUT = HERE / "results" / "scaling.json"
GRID_D = (128, 256, 512)
GRID_T = (64, 256, 1024)
MLP_WIDTHS = (128, 256, 512, 1024, 2048)
DEFAULT_MODES = ("plain", "ns_example", "ns_sketch64", "plain_accum", "ns_microbatch")
SKETCH_K = 64
VOCAB = 96


# -- workloads ---------------------------------------------------------------------------------------------------


def gpt_workload(d: int, t: int, tokens: int) -> Workload:
    b = max(4, tokens // t)
    gen = torch.Generator().manual_seed(SEED + d + t)
    batches = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, VOCAB, (b, t + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return Workload(
        name=f"gpt_d{d}_t{t}",
        description=f"1-block causal transformer, d={d}, 4 heads, MLP 4x, T={t}, batch {b}, vocabulary {VOCAB}",
        make_model=lambda: TinyGPT(vocab=VOCAB, ctx=t, d=d, heads=4, n_layer=1),
        batches=batches,
        n_classes=VOCAB,
        float_input=False,
    )


def mlp_workload(width: int) -> Workload:
    gen = torch.Generator().manual_seed(SEED + width)
    batches = [(torch.randn(128, 64, generator=gen), torch.randint(0, 10, (128,), generator=gen)) for _ in range(4)]
    return Workload(
        name=f"mlp_w{width}",
        description=f"MLP 64-{width}-{width}-10 ReLU, random inputs, batch 128",
        make_model=lambda: nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        ),
        batches=batches,
        n_classes=10,
        float_input=True,
    )


# -- the multiply-add model ----------------------------------------------------------------------------------------


def _linear_exact(t: int, m: int, n: int) -> float:
    return float(min(t * t * (m + n), t * m * n)) if t > 1 else float(m + n)


def predicted(wl: Workload) -> dict[str, float]:
    """Multiply-adds of a plain step and of the monitor's per-example norms, from the layers' shapes.

    Counted: Linear and Conv layers (the layer's own forward, input and weight gradients: 3x its forward) and,
    for the transformers, attention's two ``T x T`` products (3x as well); the monitor's cost is the form each
    layer takes (``linear_forms``, ``rules.sketch``), exact or sketched with ``k = 64``.  Norms of LayerNorm,
    embeddings and biases, and the small ops, are left out: they are linear in the activations.
    """
    model = wl.make_model()
    seen: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: seen.append((mod, tuple(i[0].shape), tuple(o.shape))))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    x, _ = wl.batches[0]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    plain = exact = sketch = 0.0
    for mod, shape_in, shape_out in seen:
        b = shape_in[0]
        if isinstance(mod, nn.Linear):
            t = 1
            for s in shape_in[1:-1]:
                t *= s
            m, n = mod.in_features, mod.out_features
            own = 3.0 * b * t * m * n
            ex = b * _linear_exact(t, m, n)
            sk = b * t * SKETCH_K * (m + n) if t > 1 else ex
        else:
            assert isinstance(mod, nn.Conv2d)
            groups = mod.groups
            pos = shape_out[2] * shape_out[3]
            k_in = mod.in_channels // groups * mod.kernel_size[0] * mod.kernel_size[1]
            k_out = mod.out_channels // groups
            own = 3.0 * b * pos * k_in * k_out * groups
            ex = b * groups * min(pos * pos * (k_in + k_out), pos * k_in * k_out)
            sk = b * pos * SKETCH_K * (k_in + k_out) * groups
        plain += own
        exact += ex
        sketch += sk if sk <= PAYS * ex else ex
    if isinstance(model, TinyGPT):
        b, t = x.shape
        d = model.tok.embedding_dim
        plain += 3.0 * len(model.blocks) * 2 * b * t * t * d
    return {
        "plain_madds": plain,
        "exact_madds": exact,
        "sketch_madds": sketch,
        "ns_example": 1.0 + exact / plain,
        "ns_sketch64": 1.0 + sketch / plain,
    }


def predicted_curve(r: float, d: int | None) -> float:
    """The predicted ratio of the grid's transformer block at ``T / d = r`` (exact when ``d`` is None, else the
    sketch with k = 64 at width ``d``), its four Linear layers and attention; the head and norms left out."""
    shapes = ((1, 3), (1, 1), (1, 4), (4, 1))  # (d_in, d_out) in units of d: qkv, proj, fc, out
    plain = 36.0 + 6.0 * r  # per token, in units of d^2
    mon = 0.0
    for a, c in shapes:
        ex = min(r * (a + c), a * c)
        if d is not None and SKETCH_K * (a + c) / d <= PAYS * ex:
            ex = SKETCH_K * (a + c) / d
        mon += ex
    return 1.0 + mon / plain


# -- measuring -----------------------------------------------------------------------------------------------------


def peak_tensor_mb(mode: Mode, wl: Workload) -> float:
    x, y = wl.batches[1 % len(wl.batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LiveTensorBytes() as live:
            mode.step(x, y)
    return live.peak / 2**20


def bench(wl: Workload, names: list[str], args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    state = wl.initial_state()
    live: dict[str, Mode] = {}
    entry: dict[str, Any] = {"description": wl.description, "batch_size": wl.batch_size, "modes": {}}
    for name in names:
        cls = MODES[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(SEED)
                live[name] = cls(wl, state)
            entry["modes"][name] = {"status": "ok", "baseline": cls.baseline}
        except Skip as e:
            entry["modes"][name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # reported, the rest goes on
            entry["modes"][name] = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing = time_modes(wl, live, args, rng)
    for name, t in timing.items():
        entry["modes"][name]["timing"] = t
    if not args.no_memory:
        for name, mode in live.items():
            entry["modes"][name]["peak_tensor_mb"] = peak_tensor_mb(mode, wl)
    for mode in live.values():
        mode.close()
    entry["timing_s"] = time.perf_counter() - t0
    entry["predicted"] = predicted(wl)
    return entry


def llm_probe() -> dict[str, Any]:
    """Peak tensor memory of one 4096 -> 11008 projection on 2 sequences of 4096 tokens (per-example norms need two
    examples; at T = 4096 the materialised form is the cheaper one): plain, the monitor with its buffers bounded, and
    with them unbounded (what the materialised form would allocate)."""
    import noisescale as ns

    torch.manual_seed(SEED)
    layer = nn.Linear(4096, 11008, bias=False)
    x = torch.randn(2, 4096, 4096)
    out: dict[str, Any] = {"shape": "Linear(4096, 11008) on (2, 4096, 4096): the materialised form is chosen"}

    def step(monitor: Any) -> None:
        layer(x).square().mean().backward()
        if monitor is not None:
            monitor.step(batch_size=2)
        layer.weight.grad = None

    saved = linear_forms.MAX_BUFFER
    for name, limit in (("plain", None), ("ns_example", saved), ("ns_example_unbounded", 1 << 40)):
        monitor = None if limit is None else ns.GNSMonitor(layer, source="example")
        linear_forms.MAX_BUFFER = limit if limit is not None else saved
        try:
            step(monitor)  # warm-up (the first step checks)
            t0 = time.perf_counter()
            with LiveTensorBytes() as live:
                step(monitor)
            out[name] = {"peak_tensor_mb": live.peak / 2**20, "step_s": time.perf_counter() - t0}
        finally:
            linear_forms.MAX_BUFFER = saved
            if monitor is not None:
                monitor.close()
        print(f"[llm] {name}: {out[name]['peak_tensor_mb']:.0f} MB", flush=True)
    for name in ("ns_example", "ns_example_unbounded"):
        out[name]["peak_x_plain"] = out[name]["peak_tensor_mb"] / out["plain"]["peak_tensor_mb"]
    return out


# -- report ----------------------------------------------------------------------------------------------------------


def _ratio(entry: dict[str, Any], name: str) -> float | None:
    m = entry["modes"].get(name, {})
    return m.get("timing", {}).get("paired_ratio")


def _peak_ratio(entry: dict[str, Any], name: str) -> float | None:
    m = entry["modes"].get(name, {})
    base = entry["modes"].get(m.get("baseline") or "", {})
    a, b = m.get("peak_tensor_mb"), base.get("peak_tensor_mb")
    return a / b if a is not None and b else None


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(results: dict[str, Any], modes: list[str]) -> str:
    meta = results["meta"]
    shown = [m for m in modes if MODES[m].baseline is not None]
    lines = [
        f"torch {meta['torch']}, {meta['cpu']}, {meta['nproc']} cores, torch threads {meta['threads']}; load average "
        f"{meta['loadavg_start']} at start, {meta.get('loadavg_end', '?')} at end; {meta['trials']} trials",
        "",
        "ratio: paired median of the mode's step over its baseline's (ns_microbatch: over plain_accum); pred: the "
        "multiply-add prediction; mem: peak tensor memory over the baseline's",
        "",
        "| workload | plain ms | " + " | ".join(f"{m} (pred) | mem" for m in shown) + " |",
        "|---|---|" + "---|---|" * len(shown),
    ]
    for name, e in results["workloads"].items():
        plain = e["modes"].get("plain", {}).get("timing", {}).get("median_ms")
        cells = []
        for m in shown:
            pred = e["predicted"].get(m)
            cells.append(f"{_f(_ratio(e, m))} ({_f(pred)}) | {_f(_peak_ratio(e, m))}")
        lines.append(f"| {name} | {_f(plain, 1)} | " + " | ".join(cells) + " |")
    llm = results.get("llm")
    if llm:
        lines += [
            "",
            f"LLM shape, {llm['shape']}: plain {llm['plain']['peak_tensor_mb']:.0f} MB of tensors at peak; the monitor "
            f"{llm['ns_example']['peak_x_plain']:.3f}x with its buffers bounded "
            f"({linear_forms.MAX_BUFFER / 2**20:.0f} M elements), {llm['ns_example_unbounded']['peak_x_plain']:.3f}x "
            "unbounded",
        ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'noisescale[bench]'): no PNG", file=sys.stderr)
        return False
    grid = {k: v for k, v in results["workloads"].items() if k.startswith("gpt_")}
    if not grid:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    rs = [2 ** (i / 8) for i in range(-24, 25)]
    ax.plot(rs, [predicted_curve(r, None) for r in rs], color="C0", label="exact, predicted (multiply-adds)")
    ds = sorted({int(k.split("_d")[1].split("_")[0]) for k in grid})
    for j, d in enumerate(ds):
        ax.plot(
            rs,
            [predicted_curve(r, d) for r in rs],
            color="C1",
            ls=(0, (4, 1 + 2 * j)),
            lw=1,
            label=f"sketch k=64, predicted, d={d}",
        )
    markers = {128: "o", 256: "s", 512: "^"}
    for mode, color, label in (
        ("ns_example", "C0", "exact"),
        ("ns_sketch64", "C1", "sketch k=64"),
        ("ns_microbatch", "C2", "microbatch (vs 4 micro-batches)"),
    ):
        for d in ds:
            pts = [
                (int(k.split("_t")[1]) / d, _ratio(e, mode))
                for k, e in grid.items()
                if int(k.split("_d")[1].split("_")[0]) == d and _ratio(e, mode) is not None
            ]
            if pts:
                ax.scatter(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    color=color,
                    marker=markers.get(d, "x"),
                    label=f"{label}, measured, d={d}",
                )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T / d (context length over width)")
    ax.set_ylabel("step time, monitored / plain")
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_title("noisescale example source: overhead against T / d (1-block transformer, CPU)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main --------------------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="grid,mlp,cnn,unet", help="comma list of grid, mlp, cnn, unet, llm")
    ap.add_argument("--d", default=",".join(map(str, GRID_D)), help="grid widths (default 128,256,512)")
    ap.add_argument("--t", default=",".join(map(str, GRID_T)), help="grid context lengths (default 64,256,1024)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch in the grid (batch = tokens / T)")
    ap.add_argument("--widths", default=",".join(map(str, MLP_WIDTHS)), help="MLP widths")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block-s", type=float, default=0.3)
    ap.add_argument("--max-inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="d=128, T in {64, 256}, widths 256, 1024, 3 trials")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.t, args.widths, args.trials, args.block_s = "128", "64,256", "256,1024", 3, 0.1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.modes.split(",") if m]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    for m in list(names):  # the baselines the modes need
        base = MODES[m].baseline
        if base is not None and base not in names:
            names.insert(0, base)
    parts = [p for p in args.parts.split(",") if p]
    jobs: list[tuple[str, Callable[[], Workload]]] = []
    if "grid" in parts:
        jobs += [
            (f"gpt_d{d}_t{t}", lambda d=d, t=t: gpt_workload(d, t, args.tokens))
            for d in _ints(args.d)
            for t in _ints(args.t)
        ]
    if "mlp" in parts:
        jobs += [(f"mlp_w{w}", lambda w=w: mlp_workload(w)) for w in _ints(args.widths)]
    if "cnn" in parts:
        jobs.append(("cnn_digits", cnn_digits))
    if "unet" in parts:
        jobs.append(("unet_denoiser", unet_denoiser))
    results: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                "unknown CPU",
            ),
            "nproc": len(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(),
            "trials": args.trials,
            "tokens": args.tokens,
            "sketch_k": SKETCH_K,
            "max_buffer_elements": linear_forms.MAX_BUFFER,
            "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": __doc__,
        },
        "workloads": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    def write() -> None:
        results["meta"]["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        table = markdown(results, names)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        args.out.with_suffix(".md").write_text(table + "\n")
        plot(results, args.out.with_suffix(".png"))

    for name, make in jobs:
        t0 = time.perf_counter()
        results["workloads"][name] = bench(make(), names, args, rng)
        e = results["workloads"][name]
        ratios = ", ".join(f"{m} {_f(_ratio(e, m))}" for m in names if _ratio(e, m) is not None)
        print(
            f"[{name}] {time.perf_counter() - t0:.0f} s: {ratios}; predicted exact "
            f"{e['predicted']['ns_example']:.2f}, sketch {e['predicted']['ns_sketch64']:.2f}",
            flush=True,
        )
        write()
    if "llm" in parts:
        results["llm"] = llm_probe()
    write()
    print("\n" + markdown(results, names))
    print(f"\nwrote {args.out}, {args.out.with_suffix('.md').name} and {args.out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
