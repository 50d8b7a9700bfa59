"""``noisescale plan --png``: steps against examples with every schedule marked, and the critical batch over training.

Needs matplotlib (``pip install 'noisescale[report]'``).
"""

from __future__ import annotations

import math
import os
from typing import Any

from noisescale.errors import NoiseScaleError
from noisescale.planning.result import Plan
from noisescale.planning.schedules import Fixed

__all__ = ["MissingDependencyError", "pyplot", "render_plan_png"]


class MissingDependencyError(NoiseScaleError, ImportError):
    """An optional package is needed for this; the message names it and how to install it."""


def pyplot() -> Any:
    """matplotlib's pyplot on a non-interactive backend, or ``MissingDependencyError`` naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(
            "noisescale plan --png needs matplotlib, which is not installed: pip install 'noisescale[report]' "
            "(or drop --png: the table and --json need nothing extra)"
        ) from None
    return plt


def render_plan_png(plan: Plan, path: str | os.PathLike[str], *, dpi: int = 110) -> None:
    """Write two panels: S against E (fixed-batch curve, the ``k x B_noise`` frontier, every schedule, the run),
    and B_simple with its band per stretch against the fraction of training, beside the batch used."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5))
    fig.suptitle(f"noisescale plan: {plan.run['name']} ({plan.run['id']})")
    s_min, e_min = plan.min_steps, plan.min_examples

    fixed = [p for p in plan.predictions if p.kind == "fixed"]
    lo = min([plan.batch_min, *(p.batch_min for p in fixed)]) / 2
    hi = max([plan.batch_max, *(p.batch_max for p in fixed)]) * 2
    grid = [lo * (hi / lo) ** (i / 59) for i in range(60)]
    curve = [plan.predict(Fixed(b), step_time=None) for b in grid]
    ax.plot([o.examples for o in curve], [o.steps for o in curve], color="C0", label="fixed batch (numbers: size)")
    if s_min > 0 and e_min > 0 and plan.frontier > 0:
        # The model's best schedule (batch proportional to sqrt(B_noise)): (S - S_min)(E - E_min) = A^2.
        a = plan.frontier
        cs = [a / s_min * 2 ** (i / 4) for i in range(-28, 29)]
        ax.plot(
            [e_min + a * c for c in cs],
            [s_min + a / c for c in cs],
            ":",
            color="0.3",
            label="best any schedule can do (batch ~ sqrt(B_noise))",
        )
        ax.axhline(s_min, color="0.7", lw=0.8, ls="--")
        ax.axvline(e_min, color="0.7", lw=0.8, ls="--")
    markers = {"replay": "*", "ramp": "s", "follow": "D", "devices": "^"}
    others = 0
    for p in plan.predictions:
        own = p.name == "this run"
        if p.kind == "fixed":
            color, label = "C0", None
        else:
            color, label = ("k" if own else f"C{1 + others % 9}"), p.name
            others += 0 if own else 1
        ax.errorbar(
            p.examples,
            p.steps,
            xerr=[[p.examples - p.examples_range[0]], [p.examples_range[1] - p.examples]],
            yerr=[[p.steps - p.steps_range[0]], [p.steps_range[1] - p.steps]],
            fmt=markers.get(p.kind, "o"),
            ms=14 if own else 6,
            color=color,
            elinewidth=0.7,
            alpha=0.9,
            label=label,
        )
        if p.kind == "fixed":
            ax.annotate(
                f"{p.batch_min:g}", (p.examples, p.steps), xytext=(4, 4), textcoords="offset points", fontsize=7
            )
    ax.set(xscale="log", yscale="log", xlabel="examples to reach the target", ylabel="optimizer steps")
    ax.set_title("steps against examples (bars: B_noise anywhere in its band)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")

    st = plan.stretches
    start = st[0].examples_start if st else 0
    total = max(plan.examples - start, 1)
    xs = [(s.examples_start + s.examples_end) / 2 / total - start / total for s in st]
    vals = [s.b_simple if s.b_simple else math.nan for s in st]
    finite = [v for v in vals if math.isfinite(v)] + [plan.batch_min, plan.batch_max]
    top, bottom = max(finite) * 4, min(finite) / 4
    # An open band end is drawn to the edge of the axes (0 and inf cannot be drawn on a log scale).
    los = [max(s.b_simple_low or 0.0, bottom) for s in st]
    his = [min(s.b_simple_high if s.b_simple_high is not None else math.inf, top) for s in st]
    bx.fill_between(xs, los, his, alpha=0.2, step="mid", label="band")
    bx.plot(xs, vals, "o-", drawstyle="steps-mid", label="B_crit ~ B_simple")
    bx.plot(xs, [s.batch for s in st], "k--", drawstyle="steps-mid", label="batch used")
    bx.set(yscale="log", xlabel="fraction of the run's examples", ylabel="examples", ylim=(bottom, top))
    bx.set_title("critical batch over training", fontsize=10)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi, format="png")
    plt.close(fig)
