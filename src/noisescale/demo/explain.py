"""The closing text of ``noisescale demo``: what was measured, what it means for the batch size, where to look."""

from __future__ import annotations

import math
import shlex
import shutil
import sys
import textwrap
from pathlib import Path

from noisescale.demo.train import DemoResult

__all__ = ["explain", "noisescale_command", "sources_agree"]

WIDTH = 100


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:,.{digits}f}"


def sources_agree(result: DemoResult) -> bool:
    """``--compare-sources``: every checkpoint's bands overlap (``False`` without checkpoints)."""
    return bool(result.checkpoints) and all(c.overlap for c in result.checkpoints)


def explain(result: DemoResult) -> str:
    s = result.summary
    b = s["b_simple"]
    loss = s["loss"] or {}
    bs = result.batch_size
    first, last, growth = b["first_fifth"], b["last_fifth"], b["growth"]
    lines = [
        f"noisescale demo: {result.task.title}",
        f"{result.steps} steps of batch {bs} ({s['examples']:,} examples) in {result.train_seconds:.1f} s, "
        f"source '{s['source']}' (coverage {_n(100 * (s['coverage'] or 0))}%)"
        + "".join(f", {k.replace('_', ' ')} {_metric(k, v)}" for k, v in result.final.items()),
        f"measurement overhead: x{result.overhead:.2f} the time of a plain training step "
        "(same batches, interleaved, measured after training)",
        "",
        f"  {'':<18}{'first fifth':>12}{'last fifth':>12}",
        f"  {'training loss':<18}{_n(loss.get('first_fifth'), 3):>12}{_n(loss.get('last_fifth'), 3):>12}",
        f"  {'B_simple':<18}{_n(first):>12}{_n(last):>12}" + (f"   (x{growth:.1f})" if growth else ""),
        f"  {'batch size used':<18}{bs:>12}{bs:>12}",
        "",
        "What this shows",
    ]
    bullets = [
        "B_simple = tr(Sigma) / |G|^2 is the batch size at which the noise in a batch's gradient is as large as its "
        "signal; it is a rough guide to the critical batch size (McCandlish et al. 2018). Well below it, doubling "
        "the batch nearly halves the steps needed; well above it, extra examples per step are mostly wasted."
    ]
    if first is not None and last is not None and math.isfinite(first) and math.isfinite(last):
        bullets.append(
            f"It started near {_n(first)}, {_relation(first, bs)} the batch size of {bs}: {_meaning(first, bs)}."
        )
        trend = "grew" if last > first else "fell"
        bullets.append(
            f"As the loss fell it {trend} x{last / first:.1f} to about {_n(last)}, {_relation(last, bs)} the batch "
            f"size: {_meaning(last, bs)}."
        )
        if last > 1.5 * first:
            bullets.append(
                "So the most efficient batch size grows during training: starting small and growing the batch "
                f"(here from about {_n(first)} towards {_n(last)}) reaches the same loss with fewer examples early and "
                "fewer steps late."
            )
    for text in bullets:
        lines += textwrap.wrap(text, WIDTH, initial_indent="  * ", subsequent_indent="    ")
    if result.checkpoints:
        lines += ["", f"Sources compared on the same steps (per-example vs {result.micro_batches} micro-batches)"]
        lines.append(
            f"  {'step':>6}  {'per-example B_simple [band]':<30}{'micro-batch B_simple [band]':<30}bands overlap"
        )
        for c in result.checkpoints:
            lines.append(
                f"  {c.step:>6}  {_band(c.example):<30}{_band(c.microbatch):<30}{'yes' if c.overlap else 'NO'}"
            )
        if result.microbatch_window is not None:
            mf, ml = result.microbatch_window
            lines.append(
                f"  first fifth {_n(first)} vs {_n(mf)}, last fifth {_n(last)} vs {_n(ml)}: the sources "
                + ("agree within their bands." if sources_agree(result) else "DISAGREE at some checkpoint.")
            )
    path = shlex.quote(str(result.path))
    cmd = noisescale_command()
    lines += [
        "",
        "Look further",
        f"  {cmd} show {path}",
        f"  {cmd} report {path} -o report.html",
    ]
    activate = Path(sys.executable).parent / "activate"
    if cmd != "noisescale" and activate.exists():
        lines.append(f"  (to type `noisescale` alone, put its virtualenv on your PATH: . {_shown(activate)})")
    return "\n".join(lines)


def noisescale_command() -> str:
    """How this shell calls the running noisescale: ``noisescale`` when that name on PATH is this installation,
    else the path of its script (``.venv/bin/noisescale`` after ``make demo``, whose virtualenv is not active), or
    ``python -m noisescale``."""
    script = Path(sys.executable).parent / "noisescale"
    found = shutil.which("noisescale")
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "noisescale"
    if script.exists():
        return _shown(script)
    return f"{shlex.quote(sys.executable)} -m noisescale"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when inside it (``.venv/bin/noisescale``), else absolute; quoted."""
    try:
        rel = path.absolute().relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(path.absolute()))
    text = str(rel)
    return shlex.quote(text if "/" in text else f"./{text}")


_MEANING = {
    "below": "a smaller batch would have made about as much progress per step with fewer examples",
    "above": "a larger batch would make each step count for more, reaching the same loss in fewer steps",
    "close to": "the batch size was about right",
}


def _relation(v: float, bs: int) -> str:
    """Where B_simple ``v`` stands against the batch size, with a margin for its noise."""
    if v < 0.8 * bs:
        return "below"
    if v > 1.25 * bs:
        return "above"
    return "close to"


def _meaning(v: float, bs: int) -> str:
    return _MEANING[_relation(v, bs)]


def _band(v: tuple[float | None, float | None, float | None]) -> str:
    return f"{_n(v[0])} [{_n(v[1])}, {_n(v[2])}]"


def _metric(key: str, v: float) -> str:
    return f"{100 * v:.1f}%" if key.endswith("accuracy") else f"{v:.3f}"
