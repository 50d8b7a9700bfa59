"""Names of the scalars every logging sink writes: one hierarchy, ``noisescale/...``, shared by all of them.

Whole model: ``noisescale/b_simple``, ``noisescale/band/low``, ``noisescale/band/high``, ``noisescale/b_simple_raw``,
``noisescale/grad_sq``, ``noisescale/trace_cov``, ``noisescale/grad_sq_raw``, ``noisescale/trace_cov_raw``,
``noisescale/batch_size``, ``noisescale/skipped_steps``, ``noisescale/coverage``.  Per parameter tensor:
``noisescale/layers/<name>/b_simple`` (``/band/low``, ``/band/high``, ``/grad_sq``, ...); per module the same
under ``noisescale/modules/<name>/``.  The user's metrics keep their own names (``loss``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from noisescale.types import COLUMNS

__all__ = ["PREFIX", "LayerKind", "column_suffix", "layer_tag", "measurement_scalars", "whole_tag"]

PREFIX = "noisescale"
LayerKind = Literal["param", "module"]
_SUFFIX = {"b_simple_low": "band/low", "b_simple_high": "band/high"}
_COUNTS = ("batch_size", "skipped_steps", "coverage")


def column_suffix(column: str) -> str:
    """``b_simple_low`` -> ``band/low``, ``b_simple_high`` -> ``band/high``; other columns keep their name."""
    return _SUFFIX.get(column, column)


def whole_tag(column: str) -> str:
    """The tag of a whole-model column or count, e.g. ``noisescale/band/low``."""
    return f"{PREFIX}/{column_suffix(column)}"


def layer_tag(kind: LayerKind, name: str, column: str) -> str:
    """The tag of one layer's column, e.g. ``noisescale/layers/0.weight/b_simple``."""
    group = "layers" if kind == "param" else "modules"
    return f"{PREFIX}/{group}/{name}/{column_suffix(column)}"


def measurement_scalars(
    d: Mapping[str, Any], *, layers: Iterable[LayerKind] = ("param",), layer_columns: Iterable[str] = ("b_simple",)
) -> list[tuple[str, float]]:
    """The ``(tag, value)`` pairs of one measurement (``Measurement.to_dict()``); undefined values are left out."""
    out: list[tuple[str, float]] = []
    for c in (*COLUMNS, *_COUNTS):
        v = d.get(c)
        if v is not None:
            out.append((whole_tag(c), float(v)))
    cols = tuple(layer_columns)
    for kind in layers:
        rows = d.get("layers" if kind == "param" else "modules") or {}
        for name, values in rows.items():
            for c in cols:
                v = values.get(c)
                if v is not None:
                    out.append((layer_tag(kind, name, c), float(v)))
    return out
