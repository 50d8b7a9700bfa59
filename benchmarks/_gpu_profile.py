"""``gpu_overhead.py``'s helper: where ``ns_example`` spends its time on a CUDA device (not part of the table).

Prints, for one workload, the GPU kernel time and the CPU time per step of ``plain`` and ``ns_example``
(torch.profiler), and the operators whose CUDA time grows most.  Usage: ``python benchmarks/_gpu_profile.py gpt``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_overhead import WORKLOADS, _build, _step


def _table(run: dict[str, Any], batches: list[Any], steps: int) -> tuple[dict[str, tuple[float, float]], float, float]:
    for i in range(3):
        _step(run, *batches[i % len(batches)], True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            _step(run, *batches[i % len(batches)], True)
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = {e.key: (e.self_device_time_total / steps, e.self_cpu_time_total / steps) for e in events}
    gpu = sum(v[0] for v in table.values())
    cpu = sum(v[1] for v in table.values())
    return table, gpu, cpu


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "gpt"
    runs, batches = _build(WORKLOADS[name], torch.device("cuda"), 0)
    steps = 10
    base, gpu_b, cpu_b = _table(runs["plain"], batches, steps)
    mode, gpu_m, cpu_m = _table(runs["ns_example"], batches, steps)
    print(
        f"{name}: per step, GPU kernel time plain {gpu_b / 1e3:.2f} ms, ns_example {gpu_m / 1e3:.2f} ms; "
        f"CPU op time plain {cpu_b / 1e3:.2f} ms, ns_example {cpu_m / 1e3:.2f} ms"
    )
    rows = sorted(
        ((v[0] - base.get(k, (0.0, 0.0))[0], v[1] - base.get(k, (0.0, 0.0))[1], k) for k, v in mode.items()),
        reverse=True,
    )
    print("top ops by added GPU time (us/step): gpu, cpu, op")
    for g, c, k in rows[:25]:
        print(f"{g:9.1f} {c:9.1f}  {k}")
    rows.sort(key=lambda r: -r[1])
    print("top ops by added CPU time (us/step): gpu, cpu, op")
    for g, c, k in rows[:25]:
        print(f"{g:9.1f} {c:9.1f}  {k}")


if __name__ == "__main__":
    main()
