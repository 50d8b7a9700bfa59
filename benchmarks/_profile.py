"""``overhead.py --profile MODE``: where a mode's time goes, against its baseline, on one workload.

Prints (1) mean ms per step by phase (zero_grad+forward+backward, statistics, optimizer step) for the mode and its
baseline, interleaved and without a profiler, (2) cProfile of the mode (top functions by own time, then
noisescale's functions by cumulative time) and (3) the ATen ops the mode adds per step over its baseline
(torch.profiler, grouped by input shapes).
"""

from __future__ import annotations

import time

from _modes import MODES, Mode
from _workloads import N_BATCHES, Workload


def profile(wl: Workload, name: str, steps: int) -> None:
    """Phase times of ``name`` against its baseline, then cProfile and torch.profiler over ``steps`` steps."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    state = wl.initial_state()
    mode = MODES[name](wl, state)
    base = MODES[mode.baseline or "plain"](wl, state)

    def phases(m: Mode, n: int) -> list[float]:
        tot = [0.0, 0.0, 0.0]
        for i in range(n):
            x, y = wl.batches[i % N_BATCHES]
            t0 = time.perf_counter()
            m.zero_grad()
            m.backward(x, y)
            t1 = time.perf_counter()
            m.statistics(x.shape[0])
            t2 = time.perf_counter()
            m.opt.step()
            t3 = time.perf_counter()
            for j, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                tot[j] += d * 1e3 / n
        return tot

    for m in (mode, base):
        phases(m, 20)  # warm-up
    rounds = 5
    acc = {id(m): [0.0, 0.0, 0.0] for m in (mode, base)}
    for _ in range(rounds):  # interleaved, so drift hits both alike
        for m in (base, mode):
            acc[id(m)] = [a + b / rounds for a, b in zip(acc[id(m)], phases(m, steps // rounds))]
    print(f"\n== {wl.name}: mean ms per step by phase ({steps} steps each, interleaved, no profiler) ==")
    print(f"{'mode':<20}{'zero_grad+fwd+bwd':>20}{'statistics':>12}{'opt.step':>10}{'total':>9}")
    for label, m in ((base.name, base), (name, mode)):
        a = acc[id(m)]
        print(f"{label:<20}{a[0]:>20.3f}{a[1]:>12.3f}{a[2]:>10.3f}{sum(a):>9.3f}")

    prof = cProfile.Profile()
    prof.enable()
    for i in range(steps):
        mode.step(*wl.batches[i % N_BATCHES])
    prof.disable()
    st = pstats.Stats(prof)
    print(f"\n== cProfile, {steps} steps of {name}: top functions by own time ==")
    st.sort_stats("tottime").print_stats(15)
    print("== cProfile: noisescale functions by cumulative time ==")
    st.sort_stats("cumulative").print_stats("noisescale", 30)

    def op_table(m: Mode) -> dict[str, tuple[float, float]]:
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as tp:
            for i in range(steps):
                m.step(*wl.batches[i % N_BATCHES])
        # Grouped by input shapes, so a small extra matmul is not priced like the model's big ones.
        return {
            f"{e.key} {e.input_shapes}": (e.count / steps, e.self_cpu_time_total / steps)
            for e in tp.key_averages(group_by_input_shape=True)
        }

    ops_base, ops_mode = op_table(base), op_table(mode)
    # Rank by (added calls x the op's mean self time in this mode, per input shapes): the model's own ops drift
    # in time with the machine between the two profiles, but their call counts do not change.
    added = []
    for key, (cm, tm) in ops_mode.items():
        dc = cm - ops_base.get(key, (0.0, 0.0))[0]
        if abs(dc) > 1e-9 and cm > 0:
            added.append((dc * tm / cm, dc, tm / cm, key))
    added.sort(reverse=True)
    print(
        f"== torch.profiler: ops {name} adds per step over {base.name}: {sum(a[1] for a in added):+.0f} calls, "
        f"~{sum(a[0] for a in added):.0f} us of op self time =="
    )
    print(f"{'~us/step':>9}{'calls/step':>12}{'us/call':>9}  op")
    for est, dc, per_call, key in added[:25]:
        print(f"{est:>9.1f}{dc:>+12.1f}{per_call:>9.1f}  {key}")
    mode.close()
