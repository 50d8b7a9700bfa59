"""``noisescale report``: one self-contained HTML page for a run, with inline SVG charts (works offline).

Charts: B_simple with its band and the batch size; the loss (and other metrics); the smoothed ``|G|^2`` and
``tr(Sigma)``; a per-layer heat map of B_simple over time.  Each is drawn against examples seen, optimizer steps
and wall time, and a switch at the top shows one of them (radio buttons and CSS).  Hovering a chart shows its
values (SVG titles).  Then the config and the events.  The page holds no script and references nothing outside
itself.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from html import escape
from typing import Any

from noisescale.errors import ConfigError
from noisescale.report.svg import PALETTE, Band, Line, heatmap, line_chart
from noisescale.report.xaxis import X_AXES, XAxis, XScale, x_scale
from noisescale.store.reader import RunReader, Series
from noisescale.store.summary import summarize

__all__ = ["render_html"]

HEATMAP_COLUMNS = 120
HEATMAP_CELLS = 30_000  # heat map cells for all three x axes together, above which only the chosen one is drawn
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 24px auto;
       max-width: 780px; padding: 0 12px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; }
.sub { color: #666; margin-top: 0; } p.note { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 10px 2px 0; text-align: left; }
th { color: #555; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg.chart { display: block; max-width: 100%; height: auto; margin: 6px 0; }
.grid { stroke: #e6e6e6; stroke-width: 1; } .frame { fill: none; stroke: #999; stroke-width: 1; }
.tick { font-size: 11px; fill: #555; } .label { font-size: 12px; fill: #333; } .legend { font-size: 12px; fill: #333; }
code, pre { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; } pre { background: #f6f6f6; padding: 8px; }
"""


def render_html(reader: RunReader, *, x: XAxis = "examples") -> str:
    """The report page of the run ``reader`` reads (one consistent snapshot of the file).

    Every chart is drawn against examples seen, optimizer steps and wall time; ``x`` is the one shown first, and
    a switch at the top of the page (plain HTML and CSS, no script) shows the others.
    """
    if x not in X_AXES:
        raise ConfigError(f"x axis must be one of {list(X_AXES)}, got {x!r}")
    with reader.snapshot():
        s = summarize(reader)
        rows = reader.measurements()
        metrics = {k: reader.metric(k) for k in reader.metric_names()}
        matrix = reader.layer_matrix("b_simple", kind="param", max_steps=HEATMAP_COLUMNS)
        events = reader.events()
    scales = [x_scale(k, start=s["started_at"], duration=s["duration_s"]) for k in X_AXES]
    wall_of_step = {r["step"]: r["wall_time"] for r in rows}

    def row_xs(scale: XScale) -> list[float | None]:
        return [scale.of(r["step"], r["examples"], r["wall_time"]) for r in rows]

    def series_xs(scale: XScale, series: Series) -> tuple[list[float | None], XScale]:
        xs = [scale.of(st, e, w) for st, e, w in zip(series.step, series.examples, series.wall_time, strict=True)]
        if scale.kind == "examples" and series.step and all(v is None for v in xs):
            steps = x_scale("steps")  # logged with no examples count and no measurement at its steps
            return [float(v) for v in series.step], steps
        return xs, scale

    def switch(chart: Callable[[XScale], str]) -> str:
        """The chart once per x axis, each in the block the page's switch shows."""
        return "\n".join(f'<div class="xv xv-{sc.kind}">{chart(sc)}</div>' for sc in scales)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>noisescale: {escape(s['name'])} ({escape(s['id'])})</title>",
        f"<style>{_CSS}{_switch_css()}</style></head><body>",
        *(f'<input type="radio" name="x" id="x-{k}" class="xr"{" checked" if k == x else ""}>' for k in X_AXES),
        "<main>",
        f"<h1>{escape(s['name'])}</h1>",
        f'<p class="sub">run {escape(s["id"])} &middot; {escape(s["status"])} &middot; started '
        f"{escape(_t(s['started_at']))} &middot; {escape(_dur(s['duration_s']))}</p>",
        _summary_table(s),
        '<p class="xbar">x axis: '
        + " ".join(f'<label for="x-{sc.kind}">{escape(_X_NAMES[sc.kind])}</label>' for sc in scales)
        + ' <span class="hint">(hover a chart for its values)</span></p>',
    ]

    # 1. B_simple, band, batch size
    other = metrics.get("microbatch/b_simple")
    lo_other, hi_other = metrics.get("microbatch/b_simple_low"), metrics.get("microbatch/b_simple_high")

    def b_simple_chart(scale: XScale) -> str:
        xs = row_xs(scale)
        lines = [
            Line(xs, [r["b_simple"] for r in rows], "B_simple (smoothed)", PALETTE[0], 2.0),
            Line(xs, [float(r["batch_size"]) for r in rows], "batch size", "#444444", 1.4, dash=True),
        ]
        bands = [Band(xs, [r["b_simple_low"] for r in rows], [r["b_simple_high"] for r in rows], "band", PALETTE[0])]
        if other is not None and len(other):
            ox, _ = series_xs(scale, other)
            lines.insert(1, Line(ox, other.value, "B_simple, micro-batch source", PALETTE[1], 1.4))
            if lo_other is not None and hi_other is not None and len(lo_other) == len(hi_other) == len(other):
                bands.append(Band(ox, lo_other.value, hi_other.value, "micro-batch band", PALETTE[1], 0.12))
        return line_chart(
            title="B_simple",
            x_label=scale.label,
            y_label="examples (log scale)",
            lines=lines,
            bands=bands,
            log_y=True,
            x_format=scale.format,
        )

    parts += [
        "<h2>B_simple and the batch size</h2>",
        switch(b_simple_chart),
        '<p class="note">B_simple = tr(&Sigma;) / |G|&sup2;, the batch size at which a batch gradient\'s noise '
        "equals its signal: a rough guide to the critical batch size (McCandlish et al. 2018). Where the batch size "
        "line is below it, a larger batch would cut the steps needed; above it, examples are partly wasted. "
        "The shaded band is the uncertainty of the smoothed value; a dashed mark on the frame shows where it runs "
        "past the chart (unbounded above while |G|&sup2; cannot be told from zero).</p>",
    ]

    # 2. loss and other metrics
    curves = {k: v for k, v in metrics.items() if not k.startswith("microbatch/") and len(v) >= 2}
    if curves:
        parts.append("<h2>Loss</h2>" if "loss" in curves else "<h2>Metrics</h2>")
        for i, (k, series) in enumerate(sorted(curves.items(), key=lambda kv: (kv[0] != "loss", kv[0]))):

            def metric_chart(scale: XScale, k: str = k, series: Series = series, i: int = i) -> str:
                xs, used = series_xs(scale, series)
                positive = all(v is None or v > 0 for v in series.value)
                return line_chart(
                    title=k,
                    x_label=used.label,
                    y_label=k + (" (log scale)" if positive else ""),
                    lines=[Line(xs, series.value, k, PALETTE[(2 + i) % len(PALETTE)])],
                    log_y=positive,
                    height=240,
                    x_format=used.format,
                )

            parts.append(switch(metric_chart))
    finals = {k: v.value[-1] for k, v in metrics.items() if len(v) == 1 and v.value[-1] is not None}
    if finals:
        parts.append(
            "<table>"
            + "".join(
                f'<tr><th>{escape(k)}</th><td class="num">{escape(_num(v, 4))}</td></tr>' for k, v in finals.items()
            )
            + "</table>"
        )

    # 3. |G|^2 and tr(Sigma)
    parts.append("<h2>|G|&sup2; and tr(&Sigma;)</h2>")
    for key, label, color in (("grad_sq", "|G|^2", PALETTE[2]), ("trace_cov", "tr(Sigma)", PALETTE[3])):

        def component_chart(scale: XScale, key: str = key, label: str = label, color: str = color) -> str:
            return line_chart(
                title=label,
                x_label=scale.label,
                y_label=f"{label} (log scale)",
                lines=[Line(row_xs(scale), [r[key] for r in rows], f"{label} (smoothed)", color)],
                log_y=True,
                height=220,
                x_format=scale.format,
            )

        parts.append(switch(component_chart))
    parts.append(
        '<p class="note">The signal |G|&sup2; (squared norm of the true gradient) and the noise tr(&Sigma;) '
        "(total variance of one example's gradient), each smoothed on its own; B_simple is their ratio.</p>"
    )

    # 4. per-layer heat map
    parts.append("<h2>B_simple per parameter tensor</h2>")
    if matrix.names:

        def layer_map(scale: XScale) -> str:
            xs = [scale.of(st, e, wall_of_step.get(st)) for st, e in zip(matrix.step, matrix.examples, strict=True)]
            return heatmap(
                title="per-layer B_simple",
                row_labels=matrix.names,
                xs=[float("nan") if v is None else v for v in xs],
                values=matrix.values,
                x_label=scale.label,
                value_label="B_simple",
                x_format=scale.format,
            )

        if len(matrix.names) * len(matrix.step) * len(X_AXES) <= HEATMAP_CELLS:
            parts.append(switch(layer_map))
        else:  # many layers: one map, on the chosen axis, keeps the page small
            chosen = next(sc for sc in scales if sc.kind == x)
            parts.append(layer_map(chosen))
            parts.append(
                f'<p class="note">Drawn against {escape(_X_NAMES[x])} whatever the switch says (with this many '
                "layers one map keeps the page small); <code>noisescale report --x steps|examples|time</code> "
                "chooses.</p>"
            )
    else:
        parts.append('<p class="note">No per-layer values were recorded (per_layer=False).</p>')

    # 5. config and events
    parts.append("<h2>Config</h2>")
    if s["config"]:
        parts.append(
            "<table>"
            + "".join(
                f"<tr><th>{escape(str(k))}</th><td><code>{escape(json.dumps(v, default=str))}</code></td></tr>"
                for k, v in sorted(s["config"].items())
            )
            + "</table>"
        )
    else:
        parts.append('<p class="note">No config was recorded.</p>')
    if events:
        parts.append(
            "<h2>Events</h2><table><tr><th>step</th><th>kind</th><th>message</th></tr>"
            + "".join(
                f'<tr><td class="num">{escape(str(e["step"] if e["step"] is not None else "-"))}</td>'
                f"<td>{escape(str(e['kind']))}</td><td>{escape(str(e['message']))}</td></tr>"
                for e in events
            )
            + "</table>"
        )
    parts.append(
        f'<p class="note">File: <code>{escape(s["path"])}</code> &middot; written by noisescale '
        f"{escape(reader.info.noisescale_version)}, schema {reader.schema_version} &middot; report made "
        f"{escape(_t(time.time()))}</p>"
    )
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


_X_NAMES = {"examples": "examples seen", "steps": "steps", "time": "wall time"}


def _switch_css() -> str:
    """Show the charts of the checked x axis only, and mark its label (radio buttons and ``:checked``)."""
    shown = ", ".join(f"#x-{k}:checked ~ main .xv-{k}" for k in X_AXES)
    marked = ", ".join(f'#x-{k}:checked ~ main label[for="x-{k}"]' for k in X_AXES)
    return (
        "\n.xr { position: absolute; opacity: 0; pointer-events: none; } .xv { display: none; }"
        f"\n{shown} {{ display: block; }}"
        "\n.xbar label { cursor: pointer; padding: 1px 8px; border: 1px solid #bbb; border-radius: 10px; "
        "margin-right: 4px; }"
        f"\n{marked} {{ background: #1f77b4; border-color: #1f77b4; color: #fff; }}"
        "\n.xbar .hint { color: #777; font-size: 12px; } .hover:hover { fill-opacity: 0.06; }"
        "\n.clipped { fill: #555; }"
    )


def _summary_table(s: dict[str, Any]) -> str:
    b = s["b_simple"]
    loss = s["loss"]
    coverage = _num(100 * s["coverage"] if s["coverage"] is not None else None)
    growth = f" (\u00d7{b['growth']:.1f})" if b["growth"] else ""
    cells = [
        ("steps", f"{s['steps']:,}"),
        ("examples seen", f"{s['examples']:,}"),
        ("batch size (last)", _num(s["batch_size"])),
        ("source", f"{s['source'] or '-'} (coverage {coverage}%)"),
        ("B_simple (last, band)", f"{_num(b['last'])} [{_num(b['low'])}, {_num(b['high'])}]"),
        ("B_simple first fifth \u2192 last fifth", f"{_num(b['first_fifth'])} \u2192 {_num(b['last_fifth'])}{growth}"),
    ]
    if loss:
        cells.append(("loss first \u2192 last", f"{loss['first']:.4g} \u2192 {loss['last']:.4g}"))
    if s["skipped_steps"]:
        cells.append(("skipped steps", str(s["skipped_steps"])))
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in cells) + "</table>"


def _num(v: float | int | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and (digits or abs(v) < 10):
        return f"{v:.{max(digits, 3)}g}"
    return f"{v:,.0f}"


def _t(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _dur(sec: float) -> str:
    return f"{sec:.1f} s" if sec < 60 else (f"{sec / 60:.1f} min" if sec < 3600 else f"{sec / 3600:.1f} h")
