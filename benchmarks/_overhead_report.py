"""``overhead.py``'s report: the Markdown table of every workload and mode, and each target met or missed."""

from __future__ import annotations

import ddp_overhead
from _reference import NORM_RTOL

DDP_WORKLOAD = "ddp_mlp"  # not in WORKLOADS: measured by ddp_overhead in processes of its own
PEERS = ("backpack", "opacus_ghost", "func")
TARGETS = {
    "ns_example": 1.25,
    "ns_microbatch": 1.05,
    "ns_rank": ddp_overhead.TARGET,
    "peak_memory": 1.2,
    "every": 1.03,
    "budget": 1.03,
    "disarmed": 1.01,
}


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.1e}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".")


def _peak_ratio(modes: dict, name: str) -> float | None:
    """Peak live tensor bytes of a mode over its baseline's (the exact measure; RSS is shown beside it)."""
    m, base = modes[name], modes[name].get("baseline")
    mine = m.get("memory", {}).get("peak_tensor_mb")
    ref = modes.get(base, {}).get("memory", {}).get("peak_tensor_mb") if base else None
    return mine / ref if mine is not None and ref else None


def _peak_cells(mem: dict) -> str:
    if "error" in mem:
        return "error: " + mem["error"][:60] + " | -"
    return f"{_fmt(mem.get('peak_tensor_mb'))} | {_fmt(mem.get('peak_extra_mb'))}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"machine: {meta['machine']['cpu']}, {meta['machine']['nproc']} cores, torch threads "
        f"{meta['machine']['torch_threads']}; load average {meta['machine']['loadavg_start']} at start, "
        f"{meta.get('loadavg_end', '?')} at end",
        f"settings: {meta['settings']['trials']} trials, blocks of ~{meta['settings']['block_s']} s per mode, "
        f"warm-up {meta['settings']['warmup']} steps; memory over {meta['settings']['memory_steps']} steps",
    ]
    for wname, w in results["workloads"].items():
        ex = w["exact_b_simple"]
        lines += [
            "",
            f"### {wname}: {w['description']} ({w['n_params']:,} params)",
            "",
            f"exact float64 B_simple at the initial parameters on batch 0: per-example {_fmt(ex['per_example'], 4)}, "
            f"micro-batch (B_small={ex['micro_b_small']}) {_fmt(ex['micro'], 4)}",
            "",
            "| mode | median ms | p25-p75 ms | paired x (p25-p75) | vs | B_simple | exact on covered | "
            "norm max rel diff | coverage | peak tensor MB | RSS rise MB | peak x base |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in w["modes"].items():
            if m["status"] != "ok":
                lines.append(f"| {name} | {m['status']}: {m['reason'][:110]} |" + " |" * 11)
                continue
            t, c, mem = m["timing"], m.get("check", {}), m.get("memory", {})
            paired = (
                f"{t['paired_ratio']:.2f} ({t['paired_p25']:.2f}-{t['paired_p75']:.2f})" if "paired_ratio" in t else "-"
            )
            if t.get("compared_by") == "mean":  # a cadence: block means, and the ratio of all steps' means
                paired += f" means; all steps {t['mean_ratio']:.3f}"
            rel = _fmt(c.get("norm_max_rel_diff"), 2)
            if c and not c["ok"]:
                rel += " FAILED"
            cov = f"{100 * c['coverage']:.1f}%" if c.get("coverage") is not None else "-"
            lines.append(
                f"| {name} | {_fmt(t['median_ms'])} | {_fmt(t['p25_ms'])}-{_fmt(t['p75_ms'])} | {paired} | "
                f"{t['baseline'] or '-'} | {_fmt(c.get('b_simple'), 4)} | "
                f"{_fmt(c.get('exact_b_simple_on_covered'), 4) if c else '-'} | {rel} | {cov} | "
                f"{_peak_cells(mem)} | {_fmt(_peak_ratio(w['modes'], name), 2)} |"
            )
        checks = {n: m.get("check", {}) for n, m in w["modes"].items()}
        diffs = {n: c["norm_max_rel_diff"] for n, c in checks.items() if "norm_max_rel_diff" in c}
        if diffs:
            worst = max(diffs, key=lambda n: diffs[n])
            verdict = "agree" if diffs[worst] <= NORM_RTOL else "DO NOT agree"
            lines += [
                "",
                f"per-example norms of {', '.join(diffs)} {verdict} with the exact reference on the parameters each "
                f"covers (largest relative difference {diffs[worst]:.1e}, {worst}; tolerance {NORM_RTOL:g})",
            ]
    ddp = results.get("ddp")
    if ddp is not None:
        lines += ["", *ddp_markdown(ddp)]
    lines += ["", "targets (reported, not enforced):", *(f"- {t}" for t in results["targets"])]
    return "\n".join(lines)


def ddp_markdown(ddp: dict) -> list[str]:
    c = ddp["config"]
    if ddp["status"] != "ok":
        return [f"### {DDP_WORKLOAD}: DDP at global batch {c['batch']}: {ddp['status']}: {ddp['reason'][:200]}"]
    q, r, cr = ddp["step_quartiles_ms"], ddp["paired_ratio"], ddp["paired_cpu_ratio"]
    return [
        f"### {DDP_WORKLOAD}: DDP, {c['world']} gloo processes x {c['threads']} thread, MLP of "
        f"{ddp['params'] / 1e6:.2f} M parameters, global batch {c['batch']} ({c['batch'] // c['world']} per rank), "
        f"{c['trials']} interleaved trials of {c['steps']} steps",
        "",
        "| mode | median ms | p25-p75 ms | paired x (p25-p75) | vs | paired x of CPU time (p25-p75) |",
        "|---|---|---|---|---|---|",
        f"| plain_ddp | {q['plain'][1]:.3f} | {q['plain'][0]:.3f}-{q['plain'][2]:.3f} | - | - | - |",
        f"| ns_rank | {q['ns_rank'][1]:.3f} | {q['ns_rank'][0]:.3f}-{q['ns_rank'][2]:.3f} | "
        f"{r['median']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) | plain_ddp | "
        f"{cr['median']:.2f} ({cr['q1']:.2f}-{cr['q3']:.2f}) |",
    ]


def assess_targets(results: dict) -> list[str]:
    out = []
    for wname, w in results["workloads"].items():
        modes = w["modes"]

        def paired(name: str, modes: dict = modes) -> float | None:
            m = modes.get(name, {})
            return m.get("timing", {}).get("paired_ratio") if m.get("status") == "ok" else None

        ex = paired("ns_example")
        if ex is not None:
            cov = modes["ns_example"].get("check", {}).get("coverage")
            peers = {p: paired(p) for p in PEERS if paired(p) is not None}
            ok = ex <= TARGETS["ns_example"] and cov == 1.0 and all(ex < v for v in peers.values())
            cheaper = ", ".join(f"{p} {v:.3f}" for p, v in peers.items()) or "no peer ran"
            out.append(
                f"{'met' if ok else 'MISSED'}: {wname} ns_example {ex:.3f}x plain (target <= "
                f"{TARGETS['ns_example']}), coverage {100 * (cov or 0):.1f}% (target 100%), peers: {cheaper}"
            )
        for name, what in (("ns_every10", "every"), ("ns_microbatch_every10", "every"), ("ns_budget", "budget")):
            r = paired(name)
            if r is not None:
                mean_r = modes[name]["timing"]["mean_ratio"]
                ok = r <= TARGETS[what] and mean_r <= TARGETS[what]
                out.append(
                    f"{'met' if ok else 'MISSED'}: {wname} {name} {r:.3f}x {modes[name]['baseline']} by paired block "
                    f"means, {mean_r:.3f}x by all steps' means (target <= {TARGETS[what]})"
                )
        dis = paired("ns_disarmed")
        if dis is not None:
            ok = dis <= TARGETS["disarmed"]
            out.append(
                f"{'met' if ok else 'MISSED'}: {wname} ns_disarmed {dis:.3f}x plain (target <= {TARGETS['disarmed']})"
            )
        mb = paired("ns_microbatch")
        if mb is not None:
            ok = mb <= TARGETS["ns_microbatch"]
            out.append(
                f"{'met' if ok else 'MISSED'}: {wname} ns_microbatch {mb:.3f}x plain_accum "
                f"(target <= {TARGETS['ns_microbatch']})"
            )
        for name in modes:
            r = _peak_ratio(modes, name) if name.startswith("ns_") else None
            if r is not None:
                ok = r <= TARGETS["peak_memory"]
                out.append(
                    f"{'met' if ok else 'MISSED'}: {wname} {name} peak tensor memory {r:.3f}x "
                    f"{modes[name]['baseline']} (target <= {TARGETS['peak_memory']})"
                )
    ddp = results.get("ddp")
    if ddp is not None and ddp["status"] == "ok":
        ratio = ddp["paired_ratio"]["median"]
        out.append(
            f"{'met' if ratio <= TARGETS['ns_rank'] else 'MISSED'}: {DDP_WORKLOAD} ns_rank {ratio:.3f}x plain DDP "
            f"(target <= {TARGETS['ns_rank']})"
        )
    return out
