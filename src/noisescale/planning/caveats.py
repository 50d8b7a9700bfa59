"""Where McCandlish et al.'s model is weak for a given run: the warnings ``noisescale.plan`` attaches to a plan."""

from __future__ import annotations

import math

from noisescale.planning.analysis import Analysis
from noisescale.planning.result import PlanWarning, Prediction
from noisescale.planning.stretches import Stretch

__all__ = ["ABOVE_CRITICAL", "EXTRAPOLATION_FACTOR", "FAR_FACTOR", "SHORT_RUN", "WIDE_FACTOR", "caveats"]

SHORT_RUN = 100
"""Fewer usable measurements than this and the plan carries a ``short_run`` warning."""
WIDE_FACTOR = 4.0
"""A stretch whose band's upper end is more than this factor above its lower end gets a ``wide_band`` warning."""
FAR_FACTOR = 8.0
"""A stretch whose batch was more than this factor away from its B_simple gets a ``far_from_batch`` warning."""
ABOVE_CRITICAL = 1.0
"""A run whose batch went above this multiple of its own critical batch ``E_min / S_min`` gets an
``above_critical`` warning (in ``benchmarks/plan_check.py``, plans from such runs overstated the steps of smaller
batches by up to 2x)."""
EXTRAPOLATION_FACTOR = 8.0
"""A schedule whose batch goes more than this factor beyond the run's batches is flagged ``extrapolated``."""


def caveats(analysis: Analysis, predictions: list[Prediction], *, critical_batch: float) -> list[PlanWarning]:
    """The warnings of one plan, in a fixed order (see ``PlanWarning.code``)."""
    out = []
    st = analysis.stretches
    total = sum(s.examples for s in st) or 1

    def share(group: list[Stretch]) -> float:
        return sum(s.examples for s in group) / total

    def which(group: list[Stretch]) -> str:
        return ", ".join(str(s.index + 1) for s in group)

    filled = [s for s in st if s.filled]
    if filled:
        out.append(
            PlanWarning(
                "undefined",
                f"B_simple is undefined (|G|^2 not above 0, or tr(Sigma) below 0) in stretch(es) {which(filled)} "
                f"({100 * share(filled):.0f}% of the examples); their value is taken from the neighbouring stretches",
                share(filled),
            )
        )
    unbounded = [s for s in st if not s.filled and s.b_simple_high == math.inf]
    if unbounded:
        out.append(
            PlanWarning(
                "unbounded_band",
                f"B_simple's band is unbounded above in stretch(es) {which(unbounded)} "
                f"({100 * share(unbounded):.0f}% of the examples): the ranges allow any noise scale there",
                share(unbounded),
            )
        )
    wide = [
        s
        for s in st
        if not s.filled
        and s.b_simple_high is not None
        and s.b_simple_high != math.inf
        and s.b_simple_high > WIDE_FACTOR * (s.b_simple_low or 0.0)
    ]
    if wide:
        out.append(
            PlanWarning(
                "wide_band",
                f"B_simple's band spans more than a factor {WIDE_FACTOR:g} in stretch(es) {which(wide)} "
                f"({100 * share(wide):.0f}% of the examples): see the ranges, not only the point predictions",
                share(wide),
            )
        )
    if analysis.measured < SHORT_RUN:
        out.append(
            PlanWarning(
                "short_run",
                f"only {analysis.measured} usable measurements of B_simple (fewer than {SHORT_RUN}): each stretch's "
                "noise scale rests on few steps",
            )
        )
    far = [s for s in st if s.b_simple and (s.batch > FAR_FACTOR * s.b_simple or s.b_simple > FAR_FACTOR * s.batch)]
    if far:
        above = sum(1 for s in far if s.b_simple is not None and s.batch > s.b_simple)
        out.append(
            PlanWarning(
                "far_from_batch",
                f"the batch used was more than {FAR_FACTOR:g}x from B_simple in stretch(es) {which(far)} "
                f"({100 * share(far):.0f}% of the examples; {above} above, {len(far) - above} below): there the run "
                "says little about the other regime, and predictions for it rest on B_simple alone",
                share(far),
            )
        )
    b_max = max(r.examples_taken / r.steps for r in analysis.rows if r.steps > 0)
    if b_max > ABOVE_CRITICAL * critical_batch:
        out.append(
            PlanWarning(
                "above_critical",
                f"the run's batch reached {b_max:,.0f}, {b_max / critical_batch:.2g}x its critical batch E_min/S_min "
                f"= {critical_batch:,.0f}: the noise scale measured along a large-batch path can overstate what a "
                "smaller batch meets, so the steps predicted for smaller batches may be too high (see docs/plan.md)",
            )
        )
    extra = [p.name for p in predictions if p.extrapolated]
    if extra:
        out.append(
            PlanWarning(
                "extrapolation",
                f"{', '.join(extra)}: batch sizes more than {EXTRAPOLATION_FACTOR:g}x beyond the run's own "
                "(the learning rate is assumed re-tuned for them)",
            )
        )
    if not analysis.has_loss:
        out.append(
            PlanWarning(
                "no_loss",
                "no training loss was logged: the plan runs to the end of the run and gives no critical batch by "
                "loss level (log it with run.log(step, {'loss': loss}))",
            )
        )
    if analysis.coverage is not None and analysis.coverage < 1.0:
        out.append(
            PlanWarning(
                "coverage",
                f"B_simple covers {100 * analysis.coverage:.0f}% of the trainable parameters (the rest had no "
                "per-example rule)",
            )
        )
    return out
