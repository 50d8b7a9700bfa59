"""Terminal formatting for the subcommands: numbers, aligned tables, times, JSON without NaN/inf."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["dumps_json", "fmt_duration", "fmt_num", "fmt_time", "table"]


def fmt_num(v: float | int | None, digits: int = 0) -> str:
    """``1,234`` / ``0.107`` / ``inf`` / ``-`` for missing."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if digits == 0 and isinstance(v, float) and abs(v) < 10:
        return f"{v:.3g}"
    return f"{v:,.{digits}f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] | None = None) -> str:
    """An aligned plain-text table (two spaces between columns); ``right[i]`` right-aligns column ``i``."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    align = right or [False] * len(header)

    def line(cells: Sequence[str]) -> str:
        parts = [(str(c).rjust(w) if r else str(c).ljust(w)) for c, w, r in zip(cells, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """Strict JSON: NaN and infinities become ``null`` (an unbounded band edge, an undefined value)."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False, default=str)
