"""``noisescale report --png``: the report's main charts as one static image (needs matplotlib)."""

from __future__ import annotations

import math
import os
from typing import Any

from noisescale.errors import ConfigError, NoiseScaleError
from noisescale.report.svg import OFF_SCALE
from noisescale.report.xaxis import X_AXES, XAxis, x_scale
from noisescale.store.reader import RunReader
from noisescale.store.summary import summarize

__all__ = ["MissingDependencyError", "render_png"]


class MissingDependencyError(NoiseScaleError, ImportError):
    """An optional package is needed for this; the message names it and how to install it."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(
            "--png needs matplotlib, which is not installed: pip install 'noisescale[report]' "
            "(the HTML report needs nothing extra: drop --png)"
        ) from None
    return plt


def _positive(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def render_png(reader: RunReader, path: str | os.PathLike[str], *, dpi: int = 110, x: XAxis = "examples") -> None:
    """Write a 2x2 figure: B_simple with band and batch size, loss, ``|G|^2`` and ``tr(Sigma)``, per-layer map,
    against ``x``: examples seen, optimizer steps or wall time."""
    if x not in X_AXES:
        raise ConfigError(f"x axis must be one of {list(X_AXES)}, got {x!r}")
    plt = _pyplot()
    with reader.snapshot():
        s = summarize(reader)
        rows = reader.measurements()
        loss = reader.metric("loss")
        matrix = reader.layer_matrix("b_simple", kind="param", max_steps=120)
    scale = x_scale(x, start=s["started_at"], duration=s["duration_s"])
    ex = [_nan(scale.of(r["step"], r["examples"], r["wall_time"])) for r in rows]
    wall_of_step = {r["step"]: r["wall_time"] for r in rows}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(f"noisescale: {s['name']} ({s['id']})")

    ax = axes[0][0]
    # The y range covers the lines and every band edge within OFF_SCALE of them; an edge beyond that, or an
    # unbounded one (inf cannot be drawn on a log scale), runs to just past the top and is marked there.
    finite = [v for r in rows for v in (r["b_simple"], r["batch_size"]) if _positive(v)]
    edges = [v for r in rows for v in (r["b_simple_low"], r["b_simple_high"]) if _positive(v)]
    top, bottom = 1.0, 0.1
    if finite:
        bottom, top = min(finite), max(finite)
        edges = [v for v in edges if bottom / OFF_SCALE <= v <= top * OFF_SCALE]
        bottom, top = min([bottom, *edges]) / 1.2, max([top, *edges]) * 1.2
        ax.set_ylim(bottom, top)
    ax.set_yscale("log")
    hi = [min(_nan(r["b_simple_high"]), 10 * top) for r in rows]
    lo = [max(_nan(r["b_simple_low"]), bottom / 10) for r in rows]
    if any(h >= top for h in hi):
        ax.text(
            0.99, 0.98, "band runs past the top (unbounded)", transform=ax.transAxes, ha="right", va="top", fontsize=8
        )
    ax.fill_between(ex, lo, hi, alpha=0.2, label="band")
    ax.plot(ex, [_nan(r["b_simple"]) for r in rows], label="B_simple")
    ax.plot(ex, [r["batch_size"] for r in rows], "k--", label="batch size")
    ax.set(title="B_simple and batch size", xlabel=scale.label)
    ax.legend()

    ax = axes[0][1]
    if len(loss):
        lx = [_nan(scale.of(*p)) for p in zip(loss.step, loss.examples, loss.wall_time, strict=True)]
        ax.plot(lx, [_nan(v) for v in loss.value], color="C2")
        ax.set_yscale("log")
    ax.set(title="loss", xlabel=scale.label)

    ax = axes[1][0]
    ax.plot(ex, [_nan(r["grad_sq"]) for r in rows], label="|G|^2")
    ax.plot(ex, [_nan(r["trace_cov"]) for r in rows], label="tr(Sigma)")
    ax.set_yscale("log")
    ax.set(title="|G|^2 and tr(Sigma) (smoothed)", xlabel=scale.label)
    ax.legend()

    ax = axes[1][1]
    if matrix.names and matrix.step:
        vals = [
            [math.log10(v) if v is not None and 0 < v < math.inf else math.nan for v in row] for row in matrix.values
        ]
        im = ax.imshow(
            vals,
            aspect="auto",
            interpolation="nearest",
            extent=(
                _nan(scale.of(matrix.step[0], matrix.examples[0], wall_of_step[matrix.step[0]])),
                _nan(scale.of(matrix.step[-1], matrix.examples[-1], wall_of_step[matrix.step[-1]])),
                len(matrix.names) - 0.5,
                -0.5,
            ),
        )
        ax.set_yticks(range(len(matrix.names)), matrix.names, fontsize=7)
        fig.colorbar(im, ax=ax, label="log10 B_simple")
    ax.set(title="B_simple per parameter tensor", xlabel=scale.label)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi, format="png")
    plt.close(fig)
