"""Inline SVG charts generated in Python: line charts with bands (linear or log axis) and heat maps.

No JavaScript, no fonts to fetch, no ``xmlns`` URL: the markup is meant to be inlined in an HTML5 page that
must work offline.  All text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import TypeGuard

__all__ = ["Band", "Line", "heatmap", "line_chart", "nice_ticks", "palette", "si"]

MAX_POINTS = 1500
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
# A perceptually ordered ramp (viridis anchors) for heat maps.
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


@dataclass(frozen=True)
class Line:
    xs: Sequence[float | None]
    ys: Sequence[float | None]
    label: str
    color: str = PALETTE[0]
    width: float = 1.6
    dash: bool = False
    opacity: float = 1.0


@dataclass(frozen=True)
class Band:
    xs: Sequence[float | None]
    lows: Sequence[float | None]
    highs: Sequence[float | None]
    label: str
    color: str = PALETTE[0]
    opacity: float = 0.18


def si(v: float) -> str:
    """``1.5k``, ``2M``, ``0.01``: compact tick labels."""
    a = abs(v)
    if a == 0:
        return "0"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    t = first
    while t <= hi + 1e-9 * step:
        out.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if b - a > 3 else (1, 2, 5)
    return [m * 10.0**e for e in range(a, b + 1) for m in mults if lo <= m * 10.0**e <= hi]


def _stride(n: int) -> int:
    return max(1, -(-n // MAX_POINTS))


def _ok(v: float | None, log: bool) -> TypeGuard[float]:
    return v is not None and math.isfinite(v) and (v > 0 or not log)


class _Axes:
    def __init__(
        self, x_range: tuple[float, float], y_range: tuple[float, float], log_y: bool, width: int, height: int
    ) -> None:
        self.left, self.right, self.top, self.bottom = 64, 16, 30, 40
        self.w, self.h = width, height
        self.x0, self.x1 = x_range
        self.log_y = log_y
        y0, y1 = y_range
        if log_y:
            y0, y1 = math.log10(y0), math.log10(y1)
        if y1 <= y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        if not log_y:
            pad = 0.05 * (y1 - y0)
            y0, y1 = y0 - pad, y1 + pad
        self.y0, self.y1 = y0, y1
        if self.x1 <= self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        v = math.log10(y) if self.log_y else y
        v = min(max(v, self.y0), self.y1)  # clip (an unbounded band edge runs to the frame)
        return self.top + (self.y1 - v) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)


def line_chart(
    *,
    title: str,
    x_label: str,
    y_label: str,
    lines: Sequence[Line],
    bands: Sequence[Band] = (),
    log_y: bool = False,
    width: int = 720,
    height: int = 300,
) -> str:
    """An SVG line chart; ``None``/non-finite points (and non-positive ones on a log axis) break the line."""
    xs_all = [x for xs in (*(ln.xs for ln in lines), *(b.xs for b in bands)) for x in xs if _ok(x, False)]
    ys_all = [y for ln in lines for y in ln.ys if _ok(y, log_y)]
    ys_all += [v for b in bands for v in (*b.lows, *b.highs) if _ok(v, log_y)]
    if not xs_all or not ys_all:
        return _empty(title, width, height)
    # The y range follows the lines; bands may extend past it and are clipped, so one wild band edge does not
    # squash the curves.
    line_ys = [y for ln in lines for y in ln.ys if _ok(y, log_y)] or ys_all
    lo, hi = min(line_ys), max(line_ys)
    if log_y:
        lo, hi = lo / 1.5, hi * 1.5
    ax = _Axes((min(xs_all), max(xs_all)), (lo, hi), log_y, width, height)
    out = [_open(title, width, height)]
    # grid and ticks
    yt = _log_ticks(10**ax.y0, 10**ax.y1) if log_y else nice_ticks(ax.y0, ax.y1)
    for t in yt:
        y = ax.py(t)
        out.append(f'<line x1="{ax.left}" x2="{width - ax.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{ax.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{si(t)}</text>')
    for t in nice_ticks(ax.x0, ax.x1, 6):
        x = ax.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{ax.top}" y2="{height - ax.bottom}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{height - ax.bottom + 16}" text-anchor="middle" class="tick">{si(t)}</text>')
    out.append(
        f'<rect x="{ax.left}" y="{ax.top}" width="{width - ax.left - ax.right}" '
        f'height="{height - ax.top - ax.bottom}" class="frame"/>'
    )
    out.append(
        f'<text x="{(ax.left + width - ax.right) / 2:.0f}" y="{height - 6}" text-anchor="middle" '
        f'class="label">{escape(x_label)}</text>'
    )
    out.append(
        f'<text x="14" y="{(ax.top + height - ax.bottom) / 2:.0f}" text-anchor="middle" class="label" '
        f'transform="rotate(-90 14 {(ax.top + height - ax.bottom) / 2:.0f})">{escape(y_label)}</text>'
    )
    for b in bands:
        out.extend(_band_paths(ax, b))
    for ln in lines:
        d = _path(ax, ln.xs, ln.ys)
        if d:
            dash = ' stroke-dasharray="6 4"' if ln.dash else ""
            out.append(
                f'<path d="{d}" fill="none" stroke="{ln.color}" stroke-width="{ln.width}" '
                f'stroke-opacity="{ln.opacity}"{dash}><title>{escape(ln.label)}</title></path>'
            )
    out.append(_legend(ax, lines, bands, width))
    out.append("</svg>")
    return "\n".join(out)


def _segments(
    xs: Sequence[float | None], cols: Sequence[Sequence[float | None]], accept: Callable[[float], bool]
) -> list[list[int]]:
    """Runs of (sub-sampled) indices where ``x`` and every column are usable; a gap starts a new run."""
    step = _stride(len(xs))
    segs: list[list[int]] = [[]]
    for i in range(0, len(xs), step):
        x = xs[i]
        ok = x is not None and math.isfinite(x) and all(c[i] is not None and accept(c[i]) for c in cols)  # type: ignore[arg-type]
        if ok:
            segs[-1].append(i)
        elif segs[-1]:
            segs.append([])
    return [s for s in segs if s]


def _path(ax: _Axes, xs: Sequence[float | None], ys: Sequence[float | None]) -> str:
    parts = []
    for seg in _segments(xs, [ys], lambda v: _ok(v, ax.log_y)):
        parts.append("M" + " L".join(f"{ax.px(xs[i]):.1f},{ax.py(ys[i]):.1f}" for i in seg))  # type: ignore[arg-type]
    return " ".join(parts)


def _band_paths(ax: _Axes, b: Band) -> list[str]:
    out = []
    for seg in _segments(b.xs, [b.lows, b.highs], lambda v: not math.isnan(v)):
        top = [f"{ax.px(b.xs[i]):.1f},{ax.py(_edge(b.highs[i], ax)):.1f}" for i in seg]  # type: ignore[arg-type]
        bottom = [f"{ax.px(b.xs[i]):.1f},{ax.py(_edge(b.lows[i], ax)):.1f}" for i in reversed(seg)]  # type: ignore[arg-type]
        out.append(
            f'<polygon points="{" ".join(top + bottom)}" fill="{b.color}" fill-opacity="{b.opacity}" '
            f'stroke="none"><title>{escape(b.label)}</title></polygon>'
        )
    return out


def _edge(v: float, ax: _Axes) -> float:
    """A band edge in data units, with an infinite or (log axis) non-positive edge moved to the frame."""
    if math.isinf(v):
        return 10**ax.y1 if ax.log_y else ax.y1
    if ax.log_y and v <= 0:
        return 10**ax.y0
    return v


def _legend(ax: _Axes, lines: Sequence[Line], bands: Sequence[Band], width: int) -> str:
    items = [(ln.label, ln.color, "line", ln.dash) for ln in lines] + [(b.label, b.color, "band", False) for b in bands]
    out = []
    x = ax.left + 4.0
    for label, color, kind, dash in items:
        if kind == "line":
            d = ' stroke-dasharray="6 4"' if dash else ""
            out.append(f'<line x1="{x}" x2="{x + 18}" y1="18" y2="18" stroke="{color}" stroke-width="2"{d}/>')
        else:
            out.append(f'<rect x="{x}" y="12" width="18" height="12" fill="{color}" fill-opacity="0.25"/>')
        out.append(f'<text x="{x + 22}" y="22" class="legend">{escape(label)}</text>')
        x += 30 + 6.5 * len(label)
        if x > width - 80:
            break
    return "\n".join(out)


def _open(title: str, width: int, height: int) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">'
    )


def _empty(title: str, width: int, height: int) -> str:
    return (
        f'{_open(title, width, 80)}<text x="{width / 2:.0f}" y="44" text-anchor="middle" class="label">'
        "no data yet</text></svg>"
    )


def palette(t: float) -> str:
    """``t`` in [0, 1] -> an ``#rrggbb`` colour on the viridis-like ramp."""
    t = min(1.0, max(0.0, t)) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    c = [round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*c)


def heatmap(
    *,
    title: str,
    row_labels: Sequence[str],
    xs: Sequence[float],
    values: Sequence[Sequence[float | None]],
    x_label: str,
    value_label: str,
    width: int = 720,
) -> str:
    """Rows (layers) x columns (time) coloured by ``log10(value)``; grey where undefined, ``inf`` at the top."""
    finite = [v for row in values for v in row if v is not None and math.isfinite(v) and v > 0]
    if not row_labels or not xs or not finite:
        return _empty(title, width, 80)
    label_w = min(260, 12 + 6.6 * max(len(r) for r in row_labels))
    cell_h = 16 if len(row_labels) <= 40 else 8
    top, bottom, right = 12, 64, 16
    height = int(top + cell_h * len(row_labels) + bottom)
    # Colour range from the 2nd to the 98th percentile, so one extreme layer does not wash out the others.
    logs = sorted(math.log10(v) for v in finite)
    lo, hi = logs[int(0.02 * (len(logs) - 1))], logs[round(0.98 * (len(logs) - 1))]
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    plot_w = width - label_w - right
    cell_w = plot_w / len(xs)
    out = [_open(title, width, height)]
    for i, (label, row) in enumerate(zip(row_labels, values, strict=True)):
        y = top + i * cell_h
        out.append(
            f'<text x="{label_w - 6:.0f}" y="{y + cell_h * 0.75:.1f}" text-anchor="end" class="tick">'
            f"{escape(label)}</text>"
        )
        for j, v in enumerate(row):
            if v is None or v <= 0:
                color = "#dddddd"
            elif math.isinf(v):
                color = palette(1.0)
            else:
                color = palette((math.log10(v) - lo) / (hi - lo))  # clipped to the ramp's ends
            shown = "undefined" if v is None else (f"{v:,.0f}" if math.isfinite(v) else "inf")
            out.append(
                f'<rect x="{label_w + j * cell_w:.1f}" y="{y}" width="{cell_w + 0.6:.1f}" height="{cell_h}" '
                f'fill="{color}"><title>{escape(label)} at {si(xs[j])}: {shown}</title></rect>'
            )
    base = top + cell_h * len(row_labels)
    for t in nice_ticks(xs[0], xs[-1], 6):
        x = label_w + (t - xs[0]) / max(1e-12, xs[-1] - xs[0]) * (plot_w - cell_w) + cell_w / 2
        out.append(f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle" class="tick">{si(t)}</text>')
    out.append(
        f'<text x="{label_w + plot_w / 2:.0f}" y="{base + 30}" text-anchor="middle" class="label">'
        f"{escape(x_label)}</text>"
    )
    # colour bar
    bar_x, bar_w = label_w, min(240.0, plot_w)
    for k in range(48):
        out.append(
            f'<rect x="{bar_x + k * bar_w / 48:.1f}" y="{base + 40}" width="{bar_w / 48 + 0.6:.1f}" '
            f'height="10" fill="{palette(k / 47)}"/>'
        )
    out.append(f'<text x="{bar_x}" y="{base + 62}" class="tick">{si(10**lo)}</text>')
    out.append(f'<text x="{bar_x + bar_w}" y="{base + 62}" text-anchor="end" class="tick">{si(10**hi)}</text>')
    out.append(
        f'<text x="{bar_x + bar_w + 8}" y="{base + 50}" class="tick">{escape(value_label)} (log scale, clipped; '
        "grey: undefined)</text>"
    )
    out.append("</svg>")
    return "\n".join(out)
