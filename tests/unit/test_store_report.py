"""The HTML report is one self-contained, well-formed page: inline SVG, no script, nothing fetched, all escaped."""

import math
import re
from html.parser import HTMLParser

import pytest

from noisescale.report import render_html
from noisescale.report.svg import Band, Line, heatmap, line_chart, palette
from noisescale.report.ticks import nice_ticks
from noisescale.store import Run, open_run
from noisescale.types import COLUMNS

VOID = {"meta", "br", "img", "input", "link", "hr", "area", "base", "col", "embed", "source", "track", "wbr"}


class Checker(HTMLParser):
    """Checks nesting (SVG elements self-close) and collects every attribute value that could load something."""

    def __init__(self):
        super().__init__()
        self.stack = []
        self.refs = []
        self.tags = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "action", "data") or (v and "url(" in v):
                self.refs.append((tag, k, v))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


class M:
    def __init__(self, step, b):
        self.step, self.b = step, b

    def to_dict(self, per_layer=True):
        row = {c: self.b for c in COLUMNS}
        row.update(b_simple_low=self.b / 2, b_simple_high=math.inf if self.step < 3 else self.b * 2)
        return {
            "step": self.step, "examples": 32 * self.step, "batch_size": 32, "source": "example", "coverage": 1.0,
            "status": "ok", "skipped_steps": 0, **row,
            "layers": {"enc.weight": row, "<script>alert(1)</script>": row}, "modules": {},
        }  # fmt: skip


def test_report_is_self_contained_well_formed_and_escaped(tmp_path):
    with Run("report", dir=tmp_path, config={"note": "<img src=x onerror=alert(1)>", "lr": 0.1}) as run:
        for s in range(1, 60):
            run.log_measurement(M(s, 10.0 * s))
            run.log(s, {"loss": 2.0 / s, "microbatch/b_simple": 9.0 * s})
        run.log(59, {"test_accuracy": 0.9})
        run.event("alert", "<b>B_simple</b> rose", step=30)
    with open_run(run.path) as r:
        page = render_html(r)
    assert page.startswith("<!DOCTYPE html>")
    assert (
        "http://" not in page
        and "https://" not in page
        and "//" not in re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    )
    assert "<script" not in page and "<img" not in page  # user text is escaped, never markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;B_simple&lt;/b&gt; rose" in page
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [] and checker.refs == []
    # B_simple, loss, |G|^2, tr(Sigma), per-layer heat map; each against examples, steps and wall time
    assert page.count("<svg") == 15
    assert {"polygon", "path", "rect"} <= checker.tags
    assert "B_simple, micro-batch source" in page and "test_accuracy" in page


def test_report_of_an_empty_run(tmp_path):
    with Run("empty", dir=tmp_path) as run:
        pass
    with open_run(run.path) as r:
        page = render_html(r)
    assert "no data yet" in page and "No config was recorded" in page


def test_chart_helpers():
    assert nice_ticks(0, 1000, 5) == [0, 200, 400, 600, 800, 1000]
    assert palette(0) == "#440154" and palette(1) == "#fde725"
    svg = line_chart(
        title="t", x_label="x", y_label="y", log_y=True,
        lines=[Line([1, 2, 3, None, 5], [1.0, None, 3.0, 4.0, -1.0], "a")],
        bands=[Band([1, 2, 3], [0.0, 1.0, 2.0], [math.inf, 3.0, 4.0], "b")],
    )  # fmt: skip
    assert svg.count("<path") == 1 and svg.count("<polygon") == 1 and "nan" not in svg and "inf" not in svg
    hm = heatmap(title="h", row_labels=["a", "b"], xs=[1, 2], values=[[1.0, None], [math.inf, 100.0]],
                 x_label="x", value_label="v")  # fmt: skip
    assert hm.count("<title>") == 4 and "#dddddd" in hm


@pytest.mark.parametrize("n", [1, 3000])
def test_long_series_are_thinned(n):
    xs = list(range(n))
    svg = line_chart(title="t", x_label="x", y_label="y", lines=[Line(xs, [float(x + 1) for x in xs], "a")])
    assert svg.count(" L") <= 1600
