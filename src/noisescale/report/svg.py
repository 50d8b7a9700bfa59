"""Inline SVG charts generated in Python: line charts with bands (linear or log axis) and heat maps.

No JavaScript, no fonts to fetch, no ``xmlns`` URL: the markup is meant to be inlined in an HTML5 page that
must work offline.  All text is escaped.  Hovering a chart shows the values at that point: each chart is covered
by thin transparent columns whose ``<title>`` (the browser's own tooltip) lists every line's value there.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import TypeGuard

from noisescale.report.ticks import log_ticks, nice_ticks, si, tick_labels

__all__ = ["Band", "Line", "heatmap", "line_chart", "nice_ticks", "palette", "si"]

MAX_POINTS = 1500
MAX_HOVER = 160  # hover columns per chart: enough to read a curve, few enough to keep the page small
OFF_SCALE = 1000.0  # a band edge this factor beyond the lines (log axis) is drawn at the frame and marked
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

    def beyond(self, v: float, side: str) -> bool:
        """Whether a band edge ``v`` lies past the top (``"above"``) or the bottom (``"below"``) of the plot."""
        if side == "above":
            return v > (10**self.y1 if self.log_y else self.y1)
        return v < (10**self.y0 if self.log_y else self.y0)


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
    x_format: Callable[[float], str] | None = None,
) -> str:
    """An SVG line chart; ``None``/non-finite points (and non-positive ones on a log axis) break the line.

    The y range covers the lines and their bands.  A band edge that is infinite (an unbounded band), or so far
    beyond the lines that showing it would flatten them (``OFF_SCALE``), is drawn to the frame, and a dashed mark
    along that edge of the frame says so.  ``x_format`` writes an x value in the hover text (default: a number).
    """
    xs_all = [x for xs in (*(ln.xs for ln in lines), *(b.xs for b in bands)) for x in xs if _ok(x, False)]
    line_ys = [y for ln in lines for y in ln.ys if _ok(y, log_y)]
    band_ys = [v for b in bands for v in (*b.lows, *b.highs) if _ok(v, log_y)]
    if not xs_all or not (line_ys or band_ys):
        return _empty(title, width, height)
    ax = _Axes((min(xs_all), max(xs_all)), _y_range(line_ys or band_ys, band_ys, log_y), log_y, width, height)
    out = [_open(title, width, height)]
    # grid and ticks
    yt = log_ticks(10**ax.y0, 10**ax.y1) if log_y else nice_ticks(ax.y0, ax.y1, 6)
    for t, label in zip(yt, tick_labels(yt), strict=True):
        y = ax.py(t)
        out.append(f'<line x1="{ax.left}" x2="{width - ax.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{ax.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    xt = nice_ticks(ax.x0, ax.x1, 6)
    for t, label in zip(xt, tick_labels(xt), strict=True):
        x = ax.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{ax.top}" y2="{height - ax.bottom}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{height - ax.bottom + 16}" text-anchor="middle" class="tick">{label}</text>')
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
    out.extend(_clip_marks(ax, bands))
    out.append(_legend(ax, lines, bands, width))
    out.extend(_hover(ax, lines, bands, x_label, x_format or _number))
    out.append("</svg>")
    return "\n".join(out)


def _y_range(line_ys: Sequence[float], band_ys: Sequence[float], log_y: bool) -> tuple[float, float]:
    """The lines' range, widened to every band edge within ``OFF_SCALE`` of it (log axis; five spans on a
    linear one), with some room above and below on a log axis (the linear one is padded by ``_Axes``)."""
    lo, hi = min(line_ys), max(line_ys)
    if log_y:
        reach_lo, reach_hi = lo / OFF_SCALE, hi * OFF_SCALE
    else:
        span = (hi - lo) or abs(hi) or 1.0
        reach_lo, reach_hi = lo - 5 * span, hi + 5 * span
    inside = [v for v in band_ys if reach_lo <= v <= reach_hi]
    lo, hi = min([lo, *inside]), max([hi, *inside])
    return (lo / 1.2, hi * 1.2) if log_y else (lo, hi)


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
        return 10**ax.y1 if ax.log_y else (ax.y1 if v > 0 else ax.y0)
    if ax.log_y and v <= 0:
        return 10**ax.y0
    return v


def _clip_marks(ax: _Axes, bands: Sequence[Band]) -> list[str]:
    """A dashed mark along the top (bottom) of the frame where a band runs past it, with a note saying so."""
    out = []
    notes: dict[str, str] = {}
    for b in bands:
        for side, col in (("above", b.highs), ("below", b.lows)):
            y = ax.top if side == "above" else ax.h - ax.bottom
            for seg in _segments(b.xs, [col], lambda v: not math.isnan(v)):
                runs: list[list[int]] = [[]]
                for i in seg:
                    if ax.beyond(col[i], side):  # type: ignore[arg-type]
                        runs[-1].append(i)
                    elif runs[-1]:
                        runs.append([])
                for run in (r for r in runs if r):
                    x1, x2 = ax.px(b.xs[run[0]]), ax.px(b.xs[run[-1]])  # type: ignore[arg-type]
                    x1, x2 = x1 - 1.5, x2 + 1.5  # a single point still shows
                    out.append(
                        f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y}" y2="{y}" stroke="{b.color}" stroke-width="3" '
                        f'stroke-dasharray="3 2" class="clipped"><title>{escape(b.label)} runs {side} the chart '
                        f"here{' (unbounded)' if side == 'above' else ''}</title></line>"
                    )
                    notes.setdefault(side, b.color)
    if "above" in notes:
        out.append(
            f'<text x="{ax.w - ax.right - 4}" y="{ax.top + 12}" text-anchor="end" class="tick clipped">'
            "&#9650; dashed: the band runs above the chart (unbounded)</text>"
        )
    if "below" in notes:
        out.append(
            f'<text x="{ax.w - ax.right - 4}" y="{ax.h - ax.bottom - 5}" text-anchor="end" class="tick clipped">'
            "&#9660; dashed: the band runs below the chart</text>"
        )
    return out


def _hover(
    ax: _Axes, lines: Sequence[Line], bands: Sequence[Band], x_label: str, x_format: Callable[[float], str]
) -> list[str]:
    """Transparent columns over the plot, one per hover point, each titled with every series' value there."""
    first = next((ln for ln in lines if any(_ok(x, False) for x in ln.xs)), None)
    anchor = first.xs if first is not None else bands[0].xs if bands else []
    idx = [i for i, x in enumerate(anchor) if _ok(x, False)]
    if not idx:
        return []
    idx = idx[:: max(1, -(-len(idx) // MAX_HOVER))]
    xs = [float(anchor[i]) for i in idx]  # type: ignore[arg-type]
    finders = [_Nearest(ln.xs) for ln in lines]
    band_finders = [_Nearest(b.xs) for b in bands]
    out = []
    plot_l, plot_r = ax.left, ax.w - ax.right
    for k, x in enumerate(xs):
        left = plot_l if k == 0 else (ax.px(xs[k - 1]) + ax.px(x)) / 2
        right = plot_r if k == len(xs) - 1 else (ax.px(x) + ax.px(xs[k + 1])) / 2
        left, right = max(plot_l, left), min(plot_r, right)
        if right <= left:
            continue
        text = [f"{x_label}: {x_format(x)}"]
        for ln, find in zip(lines, finders, strict=True):
            j = find(x)
            if j is not None:
                text.append(f"{ln.label}: {_value(ln.ys[j])}")
        for b, find in zip(bands, band_finders, strict=True):
            j = find(x)
            if j is not None:
                text.append(f"{b.label}: {_value(b.lows[j])} to {_value(b.highs[j])}")
        out.append(
            f'<rect x="{left:.1f}" y="{ax.top}" width="{right - left:.1f}" height="{ax.h - ax.top - ax.bottom}" '
            f'fill-opacity="0" class="hover"><title>{escape(chr(10).join(text))}</title></rect>'
        )
    return out


class _Nearest:
    """Index of the point whose x is nearest a given x (``xs`` ascending, ``None`` skipped)."""

    def __init__(self, xs: Sequence[float | None]) -> None:
        self.idx = [i for i, x in enumerate(xs) if _ok(x, False)]
        self.xs = [float(xs[i]) for i in self.idx]  # type: ignore[arg-type]

    def __call__(self, x: float) -> int | None:
        if not self.xs:
            return None
        k = bisect.bisect_left(self.xs, x)
        if k == len(self.xs) or (k > 0 and x - self.xs[k - 1] <= self.xs[k] - x):
            k -= 1
        return self.idx[k]


def _value(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "undefined"
    if math.isinf(v):
        return "unbounded" if v > 0 else "-unbounded"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _number(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.4g}"


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
    x_format: Callable[[float], str] | None = None,
) -> str:
    """Rows (layers) x columns (time) coloured by ``log10(value)``; grey where undefined, ``inf`` at the top.

    Each cell's ``<title>`` gives the layer, ``x_label`` and x (``x_format``, default a number) and the value.
    """
    fmt = x_format or _number
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
                f'fill="{color}"><title>{escape(label)}, {escape(x_label)} {fmt(xs[j])}: {shown}</title></rect>'
            )
    base = top + cell_h * len(row_labels)
    xt = nice_ticks(xs[0], xs[-1], 6)
    for t, tick in zip(xt, tick_labels(xt), strict=True):
        x = label_w + (t - xs[0]) / max(1e-12, xs[-1] - xs[0]) * (plot_w - cell_w) + cell_w / 2
        out.append(f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle" class="tick">{tick}</text>')
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
