"""``noisescale report``: one self-contained HTML page for a run, with inline SVG charts (works offline).

Charts, all against examples seen: B_simple with its band and the batch size; the loss (and other metrics);
the smoothed ``|G|^2`` and ``tr(Sigma)``; a per-layer heat map of B_simple over time.  Then the config and the
events.  The page holds no script and references nothing outside itself.
"""

from __future__ import annotations

import json
import math
import time
from html import escape
from typing import Any

from noisescale.report.svg import PALETTE, Band, Line, heatmap, line_chart
from noisescale.store.reader import RunReader
from noisescale.store.summary import summarize

__all__ = ["render_html"]

HEATMAP_COLUMNS = 120
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


def render_html(reader: RunReader) -> str:
    """The report page of the run ``reader`` reads (one consistent snapshot of the file)."""
    with reader.snapshot():
        s = summarize(reader)
        rows = reader.measurements()
        metrics = {k: reader.metric(k) for k in reader.metric_names()}
        matrix = reader.layer_matrix("b_simple", kind="param", max_steps=HEATMAP_COLUMNS)
        events = reader.events()
    ex = [float(r["examples"]) for r in rows]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>noisescale: {escape(s['name'])} ({escape(s['id'])})</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(s['name'])}</h1>",
        f'<p class="sub">run {escape(s["id"])} &middot; {escape(s["status"])} &middot; started '
        f"{escape(_t(s['started_at']))} &middot; {escape(_dur(s['duration_s']))}</p>",
        _summary_table(s),
    ]

    # 1. B_simple, band, batch size
    lines = [
        Line(ex, [r["b_simple"] for r in rows], "B_simple (smoothed)", PALETTE[0], 2.0),
        Line(ex, [float(r["batch_size"]) for r in rows], "batch size", "#444444", 1.4, dash=True),
    ]
    bands = [Band(ex, [r["b_simple_low"] for r in rows], [r["b_simple_high"] for r in rows], "band", PALETTE[0])]
    other = metrics.get("microbatch/b_simple")
    if other is not None and len(other):
        ox = [float(e) if e is not None else None for e in other.examples]
        lines.insert(1, Line(ox, other.value, "B_simple, micro-batch source", PALETTE[1], 1.4))
        lo, hi = metrics.get("microbatch/b_simple_low"), metrics.get("microbatch/b_simple_high")
        if lo is not None and hi is not None and len(lo) == len(hi) == len(other):
            bands.append(Band(ox, lo.value, hi.value, "micro-batch band", PALETTE[1], 0.12))
    parts += [
        "<h2>B_simple and the batch size</h2>",
        line_chart(
            title="B_simple",
            x_label="examples seen",
            y_label="examples (log scale)",
            lines=lines,
            bands=bands,
            log_y=True,
        ),
        '<p class="note">B_simple = tr(&Sigma;) / |G|&sup2;, the batch size at which a batch gradient\'s noise '
        "equals its signal: a rough guide to the critical batch size (McCandlish et al. 2018). Where the batch size "
        "line is below it, a larger batch would cut the steps needed; above it, examples are partly wasted. "
        "The shaded band is the uncertainty of the smoothed value.</p>",
    ]

    # 2. loss and other metrics
    parts += _schedule_charts(rows, metrics, events)
    curves = {
        k: v for k, v in metrics.items() if not k.startswith("microbatch/") and k not in _SCHEDULE and len(v) >= 2
    }
    if curves:
        parts.append("<h2>Loss</h2>" if "loss" in curves else "<h2>Metrics</h2>")
        for i, (k, series) in enumerate(sorted(curves.items(), key=lambda kv: (kv[0] != "loss", kv[0]))):
            xs = [float(e) if e is not None else None for e in series.examples]
            if all(x is None for x in xs):
                xs, x_label = [float(v) for v in series.step], "step"
            else:
                x_label = "examples seen"
            positive = all(v is None or v > 0 for v in series.value)
            parts.append(
                line_chart(
                    title=k,
                    x_label=x_label,
                    y_label=k + (" (log scale)" if positive else ""),
                    lines=[Line(xs, series.value, k, PALETTE[(2 + i) % len(PALETTE)])],
                    log_y=positive,
                    height=240,
                )
            )
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
    parts += [
        "<h2>|G|&sup2; and tr(&Sigma;)</h2>",
        *(
            line_chart(
                title=label,
                x_label="examples seen",
                y_label=f"{label} (log scale)",
                lines=[Line(ex, [r[key] for r in rows], f"{label} (smoothed)", color)],
                log_y=True,
                height=220,
            )
            for key, label, color in (("grad_sq", "|G|^2", PALETTE[2]), ("trace_cov", "tr(Sigma)", PALETTE[3]))
        ),
        '<p class="note">The signal |G|&sup2; (squared norm of the true gradient) and the noise tr(&Sigma;) '
        "(total variance of one example's gradient), each smoothed on its own; B_simple is their ratio.</p>",
    ]

    # 4. per-layer heat map
    parts.append("<h2>B_simple per parameter tensor</h2>")
    if matrix.names:
        parts.append(
            heatmap(
                title="per-layer B_simple",
                row_labels=matrix.names,
                xs=[float(e) for e in matrix.examples],
                values=matrix.values,
                x_label="examples seen",
                value_label="B_simple",
            )
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
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_SCHEDULE = ("lr", "lr_scale", "accumulation")  # the batch-size controller's metrics, drawn by _schedule_charts


def _schedule_charts(rows: list[dict[str, Any]], metrics: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """Batch size and learning rate over examples seen, when a controller ran (or the batch size changed)."""
    lr = metrics.get("lr")
    if not (lr is not None and len(lr)) and len({r["batch_size"] for r in rows}) < 2:
        return []
    decisions = sum(1 for e in events if e["kind"] == "controller")
    out = [
        "<h2>Batch size and learning rate</h2>",
        line_chart(
            title="batch size",
            x_label="examples seen",
            y_label="batch size (log scale)",
            lines=[
                Line(
                    [float(r["examples"]) for r in rows],
                    [float(r["batch_size"]) for r in rows],
                    "batch size",
                    "#444444",
                    1.8,
                )
            ],
            log_y=True,
            height=220,
        ),
    ]
    if lr is not None and len(lr) >= 2:
        xs = [float(e) if e is not None else None for e in lr.examples]
        out.append(
            line_chart(
                title="learning rate",
                x_label="examples seen",
                y_label="learning rate used",
                lines=[Line(xs, lr.value, "learning rate (first parameter group)", PALETTE[4], 1.8)],
                height=220,
            )
        )
    out.append(
        f'<p class="note">{decisions} batch-size decision(s) recorded (listed under Events). The learning rate is the '
        "one each optimizer step used, the scheduler's times the controller's multiplier.</p>"
    )
    return out


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
