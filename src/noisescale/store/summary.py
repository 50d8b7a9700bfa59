"""The key numbers of a run, for ``noisescale show``/``runs``, the demo's closing table and the report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from noisescale.columns import PRECONDITIONED
from noisescale.store.reader import RunReader

__all__ = ["summarize", "window_b_simple"]


def window_b_simple(rows: Sequence[dict[str, Any]]) -> float | None:
    """B_simple over a window of steps: mean of the raw ``tr(Sigma)`` over mean of the raw ``|G|^2``.

    Numerator and denominator are averaged separately (each per-step estimate is unbiased; their ratio is not),
    as the monitor's smoothing does.  ``None`` without usable steps, ``inf`` if the mean ``|G|^2`` is not positive.
    """
    pairs = [
        (r["trace_cov_raw"], r["grad_sq_raw"])
        for r in rows
        if r.get("status") == "ok" and r.get("trace_cov_raw") is not None and r.get("grad_sq_raw") is not None
    ]
    if not pairs:
        return None
    t = sum(p[0] for p in pairs) / len(pairs)
    g = sum(p[1] for p in pairs) / len(pairs)
    return t / g if g > 0 else math.inf


def summarize(reader: RunReader) -> dict[str, Any]:
    """A JSON-ready summary: run info, progress, B_simple (last, band, first vs last fifth) and the loss."""
    with reader.snapshot():
        info = reader.info
        rows = reader.measurements()
        loss = reader.metric("loss")
        n_events = len(reader.events())
        n_layers = len(reader.layer_names("param"))
        metrics = reader.metric_names()
        precond = [reader.metric(k) for k in PRECONDITIONED] if PRECONDITIONED[0] in metrics else None
    end = info.ended_at if info.ended_at is not None else info.updated_at
    out: dict[str, Any] = {
        "id": info.id,
        "name": info.name,
        "path": str(info.path),
        "status": info.status,
        "started_at": info.started_at,
        "updated_at": info.updated_at,
        "ended_at": info.ended_at,
        "duration_s": max(0.0, end - info.started_at),
        "steps": len(rows),
        "examples": rows[-1]["examples"] if rows else 0,
        "batch_size": rows[-1]["batch_size"] if rows else None,
        "source": rows[-1]["source"] if rows else None,
        "coverage": rows[-1]["coverage"] if rows else None,
        "skipped_steps": rows[-1]["skipped_steps"] if rows else 0,
        "layers": n_layers,
        "metrics": metrics,
        "events": n_events,
        "config": info.config,
    }
    last = next((r for r in reversed(rows) if r["b_simple"] is not None), None)
    fifth = max(1, len(rows) // 5)
    first_w = window_b_simple(rows[:fifth]) if rows else None
    last_w = window_b_simple(rows[-fifth:]) if rows else None
    out["b_simple"] = {
        "last": last["b_simple"] if last else None,
        "low": last["b_simple_low"] if last else None,
        "high": last["b_simple_high"] if last else None,
        "first_fifth": first_w,
        "last_fifth": last_w,
        "growth": (last_w / first_w) if first_w and last_w is not None and math.isfinite(last_w) else None,
    }
    out["b_precond"] = _last_preconditioned(precond) if precond is not None else None
    vals = [v for v in loss.value if v is not None]
    fifth_l = max(1, len(vals) // 5)
    out["loss"] = (
        {
            "first": vals[0],
            "last": vals[-1],
            "min": min(vals),
            "first_fifth": sum(vals[:fifth_l]) / fifth_l,
            "last_fifth": sum(vals[-fifth_l:]) / fifth_l,
        }
        if vals
        else None
    )
    return out


def _last_preconditioned(series: list[Any]) -> dict[str, Any]:
    """Adam's preconditioned noise scale at the last step it was defined (``GNSMonitor(precondition=)``)."""
    value, low, high = series[0], series[1], series[2]
    i = next((i for i in range(len(value) - 1, -1, -1) if value.value[i] is not None), None)
    if i is None:
        return {"last": None, "low": None, "high": None, "step": None}
    at = value.step[i]
    return {
        "last": value.value[i],
        "low": _at(low, at),
        "high": _at(high, at),
        "step": at,
    }


def _at(series: Any, step: int) -> float | None:
    return next((v for s, v in zip(series.step, series.value) if s == step), None)
