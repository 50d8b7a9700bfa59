"""The dashboard in a real browser (Debian's headless Chromium through Playwright), serving a finished run and a
training that writes its run while the page is open: the charts draw, the numbers shown are the stored ones, new
points and a new alert appear live, and markup in the data stays text.  Screenshots: tests/browser/artifacts/."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from tests.helpers.training_runs import MARKUP, LiveTraining, train_run

from noisescale.store import RunReader

pytestmark = pytest.mark.usefixtures("one_thread")

CHARTS = ("chart-noise", "chart-loss", "chart-gradients")
EVIL_NAME = '<img src=x onerror="window.__pwned=1">evil'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from noisescale.dashboard import DashboardServer

    root = tmp_path_factory.mktemp("browser-runs")
    done = train_run(root, name="done", steps=40)
    # Run names cannot hold markup through `Run`, but a file can be edited: the page must still show text.
    evil = train_run(root, name="evil", steps=6, events=False)
    adam = train_run(root, name="adam", steps=30, events=False, adam=True)
    with sqlite3.connect(evil) as conn:
        conn.execute("UPDATE run SET name = ?", (EVIL_NAME,))
    live = LiveTraining(root, name="live", delay=0.03).start()
    live.wait_for_step(5)
    with DashboardServer(root, port=0, poll_interval=0.2).start() as server:
        yield {"server": server, "done": done, "live": live, "root": root, "adam": adam}
    live.stop()


def _value(page, testid: str) -> float:
    return float(page.get_by_test_id(testid).get_attribute("data-value"))


def _canvas_sizes(page, testid: str) -> list[tuple[float, float]]:
    boxes = page.eval_on_selector_all(
        f"[data-testid={testid}] canvas", "cs => cs.map(c => [c.getBoundingClientRect().width, c.height])"
    )
    return [tuple(b) for b in boxes]


def _open_run(p, server, run_id: str) -> None:
    p.page.goto(server.url + "#/run/" + run_id)
    for testid in CHARTS:
        p.page.wait_for_selector(f"[data-testid={testid}] canvas")
    p.page.wait_for_selector("[data-testid=heatmap-canvas]")


def test_runs_list_and_charts_draw(site, page):
    server = site["server"]
    page.page.goto(server.url)
    page.page.wait_for_selector("[data-testid=run-row] >> nth=3")
    names = page.page.locator("[data-testid=run-name] a").all_text_contents()
    assert sorted(names) == sorted(["adam", "done", "live", EVIL_NAME])  # a name with markup, shown as text
    assert page.page.evaluate("typeof window.__pwned") == "undefined"
    page.shot("runs-list")
    page.page.get_by_role("link", name="done", exact=True).click()
    page.page.wait_for_url(re.compile(r"#/run/done-"))
    _open_run(page, server, site["done"].stem)
    for testid in (*CHARTS, "heatmap"):
        sizes = _canvas_sizes(page.page, testid)
        assert sizes and all(w > 100 and h > 50 for w, h in sizes), (testid, sizes)
    page.shot("run-finished")
    assert page.errors == []


def test_values_shown_equal_the_stored_ones(site, page):
    _open_run(page, site["server"], site["done"].stem)
    p = page.page
    with RunReader(site["done"]) as reader:
        rows = reader.measurements()
        last = rows[-1]
        last_b = next(r for r in reversed(rows) if r["b_simple"] is not None)
        config = reader.info.config
        alerts = [e for e in reader.events() if e["kind"] == "alert"]
        decisions = [e for e in reader.events() if e["kind"] == "controller"]
        loss, lr = reader.metric("loss").value[-1], reader.metric("lr").value[-1]
        latest = {k: v["b_simple"] for k, v in reader.latest_layers().items()}
    assert _value(p, "kn-step") == last["step"] and _value(p, "kn-examples") == last["examples"]
    assert _value(p, "kn-batch-size") == last["batch_size"]
    assert _value(p, "kn-b-simple") == last_b["b_simple"]  # exact: the number behind the text
    assert float(p.get_by_test_id("kn-b-simple").text_content()) == pytest.approx(last_b["b_simple"], rel=1e-3)
    assert _value(p, "kn-loss") == loss and _value(p, "kn-lr") == lr
    assert p.get_by_test_id("kn-status").text_content() == "finished"
    shown = dict(
        zip(
            p.locator("[data-testid=config-row] th").all_text_contents(),
            p.get_by_test_id("config-value").all_text_contents(),
        )
    )
    assert shown == {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in config.items()}
    assert p.get_by_test_id("alert-message").all_text_contents() == [e["message"] for e in alerts]
    assert p.get_by_test_id("alert-action").all_text_contents() == [e["data"]["action"] for e in alerts]
    assert p.get_by_test_id("decision-reason").all_text_contents() == [e["message"] for e in decisions]
    layers = p.get_by_test_id("heatmap-layer").all_text_contents()
    assert layers == sorted(latest, key=lambda n: -latest[n])  # noisiest first
    # Short runs are drawn whole: one point per stored step on the B_simple chart.
    assert int(p.get_by_test_id("chart-noise-caption").get_attribute("data-points")) == len(rows)
    assert page.errors == []


def test_markup_in_the_data_stays_text(site, page):
    _open_run(page, site["server"], site["done"].stem)
    p = page.page
    note = p.locator("[data-testid=config-row]", has=p.locator("th", has_text="note"))
    assert note.get_by_test_id("config-value").text_content() == MARKUP
    assert p.get_by_test_id("alert-message").first.text_content().endswith(MARKUP)
    assert p.eval_on_selector_all("img[src=x], [data-testid=app] script", "els => els.length") == 0
    assert p.evaluate("typeof window.__pwned") == "undefined"


def test_new_points_and_an_alert_appear_while_the_run_writes(site, page):
    live: LiveTraining = site["live"]
    _open_run(page, site["server"], live.path.stem)
    p = page.page
    # Predicates as functions: the page's Content-Security-Policy forbids evaluating strings (and so it should).
    p.wait_for_function("() => document.querySelector('[data-testid=live]').textContent.startsWith('live')")
    before = int(p.get_by_test_id("chart-noise-caption").get_attribute("data-points"))
    step_before = _value(p, "kn-step")
    p.wait_for_function(
        "n => Number(document.querySelector('[data-testid=chart-noise-caption]').dataset.points) >= n", arg=before + 10
    )
    assert _value(p, "kn-step") > step_before
    page.shot("run-live")
    message = "B_simple jumped <b>10x</b> at once: check the latest shard"
    step = live.fire_alert(message)
    row = p.locator("[data-testid=alert-row]", has_text="B_simple jumped")
    row.wait_for()
    assert row.get_by_test_id("alert-message").text_content() == message  # as text, tags and all
    assert row.locator("td").first.text_content() == str(step)
    assert p.locator("[data-testid=alerts-body] b").count() == 0
    p.wait_for_function("() => document.querySelector('[data-testid=kn-alerts]').dataset.value === '1'")
    page.shot("run-live-alert")
    # The run ends: the page gets the last rows and the final status, and then shows the stored numbers.
    live.stop()
    p.wait_for_function("() => document.querySelector('[data-testid=live]').textContent === 'finished'")
    with RunReader(live.path) as reader:
        rows = reader.measurements()
        loss = reader.metric("loss").value[-1]
    assert _value(p, "kn-step") == rows[-1]["step"] and _value(p, "kn-loss") == loss
    last_b = next(r for r in reversed(rows) if r["b_simple"] is not None)
    assert _value(p, "kn-b-simple") == last_b["b_simple"]
    assert int(p.get_by_test_id("chart-noise-caption").get_attribute("data-points")) == len(rows)
    assert page.errors == []


def test_overlay_of_two_runs(site, page):
    p = page.page
    p.goto(site["server"].url)
    p.wait_for_selector("[data-testid=run-row] >> nth=2")
    for row in p.get_by_test_id("run-row").all():
        if row.get_by_role("link").text_content() in ("done", "live"):
            row.get_by_test_id("select-run").check()
    p.get_by_test_id("compare-button").click()
    p.wait_for_selector("[data-testid=chart-compare] canvas")
    assert sorted(p.locator("[data-testid=compare-run] a").all_text_contents()) == ["done", "live"]
    sizes = _canvas_sizes(p, "chart-compare")
    assert sizes and all(w > 100 and h > 50 for w, h in sizes)
    p.get_by_test_id("compare-column").select_option("metric:loss")
    p.wait_for_url(re.compile(r"metric=loss"))
    p.wait_for_selector("[data-testid=chart-compare] canvas")
    page.shot("overlay")
    assert page.errors == []


def test_a_token_guarded_dashboard_works_from_its_printed_address(site, page):
    from noisescale.dashboard import DashboardServer

    with DashboardServer(site["root"], port=0, token="t0k3n").start() as server:
        p = page.page
        answer = p.goto(server.url.split("?")[0])
        assert answer is not None and answer.status == 401
        p.goto(server.url)  # ...?token=t0k3n: the page, its scripts and its API calls all pass
        p.wait_for_selector("[data-testid=run-row] >> nth=1")
        p.get_by_role("link", name="done", exact=True).click()
        p.wait_for_selector("[data-testid=chart-noise] canvas")
        page.errors = [e for e in page.errors if "401" not in e]  # the first, token-less visit
        assert page.errors == []


def _legend(p, testid: str) -> list[str]:
    return p.eval_on_selector_all(
        f"[data-testid={testid}] .u-legend .u-series th", "ths => ths.map(t => t.textContent)"
    )


def test_adams_noise_scale_is_drawn_with_b_simple_and_the_x_axis_switches(site, page):
    server = site["server"]
    _open_run(page, server, site["adam"].stem)
    p = page.page
    legend = _legend(p, "chart-noise")
    assert any("B_precond" in t for t in legend), legend
    titles = p.eval_on_selector_all("[data-testid=metric-charts] h3", "hs => hs.map(h => h.textContent)")
    assert not [t for t in titles if t.startswith("b_precond")], titles  # not four small charts of its own
    drawn = p.evaluate(
        "() => { const u = [...document.querySelectorAll('[data-testid=chart-noise] .u-legend .u-series th')];"
        " return u.length; }"
    )
    assert drawn >= 9  # x, B_simple and band, batch, lr, B_precond and band
    page.shot("run-adam")
    for axis in ("step", "wall_time", "examples"):
        p.get_by_test_id("x-axis").select_option(axis)
        p.wait_for_selector("[data-testid=chart-noise] canvas")
        assert any("B_precond" in t for t in _legend(p, "chart-noise"))
    assert page.errors == []
