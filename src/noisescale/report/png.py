"""``noisescale report --png``: the report's main charts as one static image (needs matplotlib)."""

from __future__ import annotations

import math
import os
from typing import Any

from noisescale.errors import NoiseScaleError
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


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def render_png(reader: RunReader, path: str | os.PathLike[str], *, dpi: int = 110) -> None:
    """Write a 2x2 figure: B_simple with band and batch size, loss, ``|G|^2`` and ``tr(Sigma)``, per-layer map."""
    plt = _pyplot()
    with reader.snapshot():
        s = summarize(reader)
        rows = reader.measurements()
        loss = reader.metric("loss")
        matrix = reader.layer_matrix("b_simple", kind="param", max_steps=120)
    ex = [r["examples"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(f"noisescale: {s['name']} ({s['id']})")

    ax = axes[0][0]
    finite = [r["b_simple"] for r in rows if r["b_simple"] and math.isfinite(r["b_simple"]) and r["b_simple"] > 0]
    finite += [r["batch_size"] for r in rows]
    top = max(finite) * 1.5 if finite else 1.0
    ax.set_yscale("log")
    if finite:
        ax.set_ylim(min(finite) / 1.5, top)
    # An unbounded band edge is drawn to just past the top of the axes (inf cannot be drawn on a log scale).
    hi = [min(_nan(r["b_simple_high"]), 10 * top) for r in rows]
    lo = [max(_nan(r["b_simple_low"]), 1e-300) for r in rows]
    ax.fill_between(ex, lo, hi, alpha=0.2, label="band")
    ax.plot(ex, [_nan(r["b_simple"]) for r in rows], label="B_simple")
    ax.plot(ex, [r["batch_size"] for r in rows], "k--", label="batch size")
    ax.set(title="B_simple and batch size", xlabel="examples seen")
    ax.legend()

    ax = axes[0][1]
    if len(loss):
        ax.plot([_nan(e) for e in loss.examples], [_nan(v) for v in loss.value], color="C2")
        ax.set_yscale("log")
    ax.set(title="loss", xlabel="examples seen")

    ax = axes[1][0]
    ax.plot(ex, [_nan(r["grad_sq"]) for r in rows], label="|G|^2")
    ax.plot(ex, [_nan(r["trace_cov"]) for r in rows], label="tr(Sigma)")
    ax.set_yscale("log")
    ax.set(title="|G|^2 and tr(Sigma) (smoothed)", xlabel="examples seen")
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
            extent=(matrix.examples[0], matrix.examples[-1], len(matrix.names) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(matrix.names)), matrix.names, fontsize=7)
        fig.colorbar(im, ax=ax, label="log10 B_simple")
    ax.set(title="B_simple per parameter tensor", xlabel="examples seen")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi, format="png")
    plt.close(fig)
