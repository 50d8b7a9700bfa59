"""The report's charts, read back from their SVG: ticks, the band inside the plot, hover values, the x axis."""

from __future__ import annotations

import itertools
import math
import random
import re
import xml.etree.ElementTree as ET

import pytest

from noisescale.columns import COLUMNS
from noisescale.report import render_html
from noisescale.report.svg import MAX_HOVER, OFF_SCALE, Band, Line, line_chart
from noisescale.report.ticks import MIN_TICKS, log_ticks, tick_labels
from noisescale.report.xaxis import x_scale
from noisescale.store import Run, open_run

WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 40  # the plot area inside the frame (svg._Axes)


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def frame(root: ET.Element) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` of the plot area, from the frame rectangle."""
    (rect,) = [r for r in root.iter("rect") if r.get("class") == "frame"]
    x, y, w, h = (float(rect.get(k)) for k in ("x", "y", "width", "height"))
    return x, x + w, y, y + h


def y_tick_labels(root: ET.Element) -> list[str]:
    x0 = frame(root)[0]
    return [t.text for t in root.iter("text") if t.get("class") == "tick" and float(t.get("x")) < x0]


def polygon_points(root: ET.Element) -> list[tuple[float, float]]:
    pts = []
    for poly in root.iter("polygon"):
        for pair in poly.get("points").split():
            x, y = pair.split(",")
            pts.append((float(x), float(y)))
    return pts


def hover_titles(root: ET.Element) -> list[str]:
    return [r.find("title").text for r in root.iter("rect") if r.get("class") == "hover"]


# -- ticks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(1.5, 2.5), (1.9, 2.1), (36, 120), (20, 80), (95, 105), (1, 1000), (0.5, 2e6), (1e-3, 1e12), (3e4, 9e4)],
)
def test_log_ticks_are_enough_round_and_distinct(lo, hi):
    ticks = log_ticks(lo, hi)
    labels = tick_labels(ticks)
    assert MIN_TICKS <= len(ticks) <= 10, labels
    assert all(lo <= t <= hi for t in ticks) and ticks == sorted(ticks)
    assert len(set(labels)) == len(labels)


def test_log_ticks_over_random_ranges():
    rng = random.Random(0)
    for _ in range(3000):
        lo = 10 ** rng.uniform(-5, 9)
        hi = lo * 10 ** rng.uniform(0.001, 12)
        ticks = log_ticks(lo, hi)
        labels = tick_labels(ticks)
        assert MIN_TICKS <= len(ticks) <= 10 and len(set(labels)) == len(labels), (lo, hi, labels)
        assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks), (lo, hi, ticks)


def test_decades_and_one_two_five():
    assert tick_labels(log_ticks(1, 1000)) == ["1", "2", "5", "10", "20", "50", "100", "200", "500", "1k"]
    assert tick_labels(log_ticks(0.5, 2e6)) == ["1", "10", "100", "1k", "10k", "100k", "1M"]


def test_a_narrow_log_axis_gets_several_labelled_ticks_not_one():
    """A B_simple that stays near 2 once gave a y axis with the single label "2"."""
    xs = list(range(1, 51))
    svg = line_chart(
        title="t", x_label="x", y_label="y", log_y=True, lines=[Line(xs, [1.8 + 0.01 * (x % 7) for x in xs], "a")]
    )
    labels = y_tick_labels(parse(svg))
    assert len(labels) >= MIN_TICKS and len(set(labels)) == len(labels), labels
    assert all(float(label) > 0 for label in labels)


# -- the band -------------------------------------------------------------------------------------------------


def test_a_finite_band_lies_inside_the_plot_unclipped():
    xs = list(range(1, 41))
    ys = [50.0 + x for x in xs]
    highs = [y * (3.0 if 10 <= x <= 20 else 1.3) for x, y in zip(xs, ys)]  # well above the lines' range
    lows = [y / 1.3 for y in ys]
    root = parse(
        line_chart(
            title="t",
            x_label="x",
            y_label="y",
            log_y=True,
            lines=[Line(xs, ys, "b")],
            bands=[Band(xs, lows, highs, "band")],
        )
    )
    x0, x1, y0, y1 = frame(root)
    pts = polygon_points(root)
    assert pts and all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in pts)
    assert min(y for _, y in pts) > y0 + 1  # the highest band edge is inside the frame, not cut at it
    assert not [e for e in root.iter() if e.get("class", "").endswith("clipped")]


@pytest.mark.parametrize("log_y", [True, False])
def test_an_unbounded_band_runs_to_the_top_and_says_so(log_y):
    xs = list(range(1, 41))
    ys = [50.0 + x for x in xs]
    highs = [math.inf if x <= 5 else y * 1.3 for x, y in zip(xs, ys)]
    highs[30] = ys[30] * OFF_SCALE * 10  # finite, but far off the scale: also drawn to the frame and marked
    lows = [y / 1.3 for y in ys]
    root = parse(
        line_chart(
            title="t",
            x_label="x",
            y_label="y",
            log_y=log_y,
            lines=[Line(xs, ys, "b")],
            bands=[Band(xs, lows, highs, "band")],
        )
    )
    x0, x1, y0, y1 = frame(root)
    pts = polygon_points(root)
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in pts)
    marks = [e for e in root.iter("line") if e.get("class") == "clipped"]
    assert len(marks) == 2 and all(float(m.get("y1")) == y0 for m in marks)
    assert all("runs above the chart" in m.find("title").text for m in marks)
    assert any(t.get("class") == "tick clipped" and "above the chart" in t.text for t in root.iter("text"))
    # the far edge did not stretch the axis: the lines keep most of the height
    line_ys = [float(v.split(",")[1]) for v in re.findall(r"[\d.]+,[\d.]+", root.find("path").get("d"))]
    assert max(line_ys) - min(line_ys) > 0.2 * (y1 - y0)


# -- hover values ---------------------------------------------------------------------------------------------


def test_hover_titles_give_every_series_at_that_x():
    xs = [float(128 * s) for s in range(1, 401)]
    b = [10.0 + s for s in range(1, 401)]
    b[150:250] = [None] * 100  # undefined over steps 151-250
    root = parse(
        line_chart(
            title="t",
            x_label="examples seen",
            y_label="y",
            log_y=True,
            lines=[Line(xs, b, "B_simple"), Line(xs, [128.0] * 400, "batch size")],
            bands=[Band(xs, [v / 2 if v else None for v in b], [math.inf] * 400, "band")],
            x_format=x_scale("examples").format,
        )
    )
    titles = hover_titles(root)
    assert 0 < len(titles) <= MAX_HOVER
    first = titles[0].split("\n")
    assert first == ["examples seen: 128", "B_simple: 11", "batch size: 128", "band: 5.5 to unbounded"]
    inside_gap = [t for t in titles if 128 * 151 <= int(t.split("\n")[0].split(": ")[1].replace(",", "")) <= 128 * 250]
    assert inside_gap and all("B_simple: undefined" in t for t in inside_gap)
    assert sum("undefined" in t for t in titles) == len(inside_gap)
    x0, x1, _, _ = frame(root)
    rects = [r for r in root.iter("rect") if r.get("class") == "hover"]
    spans = sorted((float(r.get("x")), float(r.get("x")) + float(r.get("width"))) for r in rects)
    assert spans[0][0] == x0 and abs(spans[-1][1] - x1) < 0.2  # the columns cover the plot ...
    assert all(abs(a[1] - b[0]) < 0.2 for a, b in itertools.pairwise(spans))  # ... without gaps


# -- the page: x axis switch ----------------------------------------------------------------------------------


class M:
    def __init__(self, step):
        self.step = step

    def to_dict(self, per_layer=True):
        row = {c: 10.0 * self.step for c in COLUMNS}
        return {
            "step": self.step, "examples": 32 * self.step, "batch_size": 32, "source": "example", "coverage": 1.0,
            "status": "ok", "skipped_steps": 0, **row, "layers": {"w": row}, "modules": {},
        }  # fmt: skip


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    with Run("axes", dir=tmp_path_factory.mktemp("axes")) as run:
        for s in range(1, 31):
            run.log_measurement(M(s))
            run.log(s, {"loss": 1.0 / s})
    return run.path


@pytest.mark.parametrize("x", ["examples", "steps", "time"])
def test_every_chart_comes_for_each_x_axis_and_the_chosen_one_is_checked(run_path, x):
    with open_run(run_path) as reader:
        page = render_html(reader, x=x)
    checked = re.findall(r'<input type="radio" name="x" id="x-(\w+)" class="xr"( checked)?>', page)
    assert [k for k, c in checked if c] == [x] and len(checked) == 3
    assert "<script" not in page
    for kind, label in (("examples", "examples seen"), ("steps", "step"), ("time", "wall time since the start")):
        blocks = re.findall(rf'<div class="xv xv-{kind}">(.*?)</div>', page, re.S)
        assert len(blocks) == 5  # B_simple, loss, |G|^2, tr(Sigma), heat map
        for svg in blocks:
            root = parse(svg)
            texts = [t.text or "" for t in root.iter("text")]
            assert any(t.startswith(label) for t in texts), (kind, texts[-3:])
    steps = [parse(svg) for svg in re.findall(r'<div class="xv xv-steps">(.*?)</div>', page, re.S)]
    loss_titles = hover_titles(steps[1])
    assert loss_titles[0].split("\n") == ["step: 1", "loss: 1"] and loss_titles[-1].split("\n")[0] == "step: 30"


def test_report_cli_takes_the_x_axis(run_path, tmp_path, capsys):
    from noisescale.cli.main import build_parser, main
    from noisescale.report.xaxis import X_AXES

    report = build_parser()._subparsers._group_actions[0].choices["report"]
    (x_option,) = [a for a in report._actions if a.dest == "x"]
    assert tuple(x_option.choices) == X_AXES and x_option.default == "examples"

    out = tmp_path / "r.html"
    assert main(["report", str(run_path), "--x", "steps", "-o", str(out)]) == 0
    assert 'id="x-steps" class="xr" checked' in out.read_text(encoding="utf-8")
    assert main(["report", str(run_path), "--x", "epochs"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("x", ["examples", "steps", "time"])
def test_png_against_each_x_axis(run_path, tmp_path, x):
    pytest.importorskip("matplotlib")
    from noisescale.report import render_png

    out = tmp_path / "r.png"
    with open_run(run_path) as reader:
        render_png(reader, out, x=x)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
