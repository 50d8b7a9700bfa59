"""The report's section on data sources: each group's share of tr(Sigma) over training, its values at the end, and
the examples whose gradients stay large (only for runs measured with ``step(groups=...)`` / ``example_ids=``)."""

from __future__ import annotations

import math
from html import escape

from noisescale.report.svg import PALETTE, Band, Line, line_chart
from noisescale.store.data_summary import data_summary
from noisescale.store.reader import RunReader

__all__ = ["groups_section"]

TOP_ROWS = 20


def _n(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}"


def _band(v: dict[str, object], key: str) -> str:
    return f"{_n(v.get(key))} [{_n(v.get(key + '_low'))}, {_n(v.get(key + '_high'))}]"  # type: ignore[arg-type]


def groups_section(reader: RunReader) -> str:
    """HTML for the run's groups and scored examples; empty when it recorded neither."""
    ids = reader.group_ids()
    if not ids and not reader.score_steps():
        return ""
    parts = ["<h2>Data sources and examples</h2>"]
    if ids:
        lines, bands = [], []
        for i, gid in enumerate(ids):
            color = PALETTE[i % len(PALETTE)]
            share = reader.group_series(gid, "share")
            low, high = reader.group_series(gid, "share_low"), reader.group_series(gid, "share_high")
            xs = [float(e) if e is not None else None for e in share.examples]
            lines.append(Line(xs, share.value, f"group {gid}", color))
            bands.append(Band(xs, low.value, high.value, f"group {gid} band", color, 0.12))
        parts.append(
            line_chart(
                title="share of tr(Sigma) by group",
                x_label="examples seen",
                y_label="share of tr(Sigma)",
                lines=lines,
                bands=bands,
                height=260,
            )
        )
        rows = "".join(
            f'<tr><td class="num">{gid}</td><td class="num">{v["examples"]}</td><td>{escape(_band(v, "share"))}</td>'
            f"<td>{escape(_band(v, 'b_simple'))}</td><td>{escape(_band(v, 'alignment'))}</td></tr>"
            for gid, v in reader.latest_groups().items()
        )
        parts.append(
            "<table><tr><th>group</th><th>examples (last step)</th><th>share of tr(&Sigma;)</th><th>B_simple</th>"
            f"<th>alignment</th></tr>{rows}</table>"
            "<p class=\"note\">A group's share of tr(&Sigma;) is the spread of its examples' gradients about the "
            "batch's mean gradient, over the whole batch's; its B_simple is its own noise scale, as if trained on "
            "alone; its alignment is the cosine between its mean gradient and the batch's (docs/sources.md).</p>"
        )
    summary = data_summary(reader)
    if summary["top"]:
        flipped = "label_noise" in summary
        head = "<tr><th>rank</th><th>example</th><th>group</th><th>relative score</th><th>in top 10%</th>"
        head += "<th>flipped label</th></tr>" if flipped else "</tr>"
        body = "".join(
            f'<tr><td class="num">{k}</td><td class="num">{r["example"]}</td>'
            f'<td class="num">{"-" if r["group"] is None else r["group"]}</td>'
            f'<td class="num">{r["relative"]:.2f}</td><td class="num">{100 * r["top_decile"]:.0f}%</td>'
            + (f"<td>{'yes' if r.get('label_flipped') else ''}</td>" if flipped else "")
            + "</tr>"
            for k, r in enumerate(summary["top"][:TOP_ROWS], start=1)
        )
        note = (
            f"The examples whose squared gradient norm stays largest relative to their step's mean, over "
            f"{summary['score_steps']} sampled steps ({summary['scored_examples']:,} examples scored; the top "
            f"{min(TOP_ROWS, len(summary['top']))} shown, noisescale data RUN lists more)."
        )
        if flipped:
            ln = summary["label_noise"]
            note += (
                f" The run flipped {ln['flipped']} labels on purpose: {ln['in_top']} of the top {len(summary['top'])}"
                f" are among them (precision {ln['precision']:.2f})."
            )
        parts.append(f'<table>{head}{body}</table><p class="note">{escape(note)}</p>')
    return "\n".join(parts)
