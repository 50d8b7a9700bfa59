"""``ns.plan`` on recorded runs: recovery of dS_min / dE_min, refusals, warnings, a real tiny training."""

import math
import random
import re

import pytest
import torch
from tests.helpers.plan_runs import write_run

import noisescale as ns
from noisescale.planning import Fixed, LinearRamp, PlanError, Replay, analyse, plan, predict
from noisescale.planning.stretches import crossing, cut_stretches, rows_from_measurements, smooth_loss
from noisescale.store import Run, open_run

# -- recovery from a run store ---------------------------------------------------------------------------------


def test_recovers_piecewise_min_steps_and_examples(tmp_path):
    # 400 steps of 32: B_noise 16 for the first 200 steps, 128 after.
    path = write_run(tmp_path, noise=lambda s: 16.0 if s <= 200 else 128.0)
    p = plan(path, stretches=4, batches=[8, 32, 512], ramp=None)
    assert [s.first_step for s in p.stretches] == [1, 101, 201, 301]
    expect_s = [100 / (1 + 16 / 32)] * 2 + [100 / (1 + 128 / 32)] * 2  # 66.7, 66.7, 20, 20
    expect_e = [16 * expect_s[0]] * 2 + [128 * expect_s[2]] * 2
    assert p.stretch_min_steps == pytest.approx(expect_s, rel=0.03)
    assert p.stretch_min_examples == pytest.approx(expect_e, rel=0.03)
    s_min, e_min = sum(expect_s), sum(expect_e)
    assert (p.min_steps, p.min_examples) == (pytest.approx(s_min, rel=0.03), pytest.approx(e_min, rel=0.03))
    assert p.critical_batch == pytest.approx(e_min / s_min, rel=0.05)
    # batch 32 is below B_crit 42; batch 512 is 16x the run's; the bands are narrow
    assert [w.code for w in p.warnings] == ["extrapolation"]
    for b in (8, 32, 512):
        q = p.prediction(f"batch {b}")
        by_hand = sum(ds + de / b for ds, de in zip(expect_s, expect_e))
        assert q.steps == pytest.approx(by_hand, rel=0.03)
        assert q.examples == pytest.approx(b * q.steps, rel=1e-9)
        assert q.steps_range[0] <= q.steps <= q.steps_range[1]
        assert q.examples_range[0] <= q.examples <= q.examples_range[1]
    own = p.prediction("this run")
    assert (own.steps, own.examples) == (pytest.approx(400.0), pytest.approx(400 * 32.0))
    assert p.prediction("batch 32").steps == pytest.approx(400.0)
    f = p.prediction("1 x B_simple")
    assert (f.steps, f.examples) == (pytest.approx(2 * p.min_steps), pytest.approx(2 * p.min_examples))
    assert (f.batch_min, f.batch_max) == (pytest.approx(16, rel=0.03), pytest.approx(128, rel=0.03))


def test_bands_cover_the_true_noise_and_ranges_widen_with_spread(tmp_path):
    kw = {"stretches": 5, "ramp": None, "batches": [8], "confidence": 0.999}
    narrow = plan(write_run(tmp_path / "a", noise=64.0, spread=0.05), **kw)
    wide = plan(write_run(tmp_path / "b", noise=64.0, spread=0.3), **kw)
    for p in (narrow, wide):
        assert all(s.b_simple_low <= 64.0 <= s.b_simple_high for s in p.stretches)
        assert all(s.b_simple_high < 1.5 * s.b_simple_low for s in p.stretches)
    n, w = narrow.prediction("batch 8"), wide.prediction("batch 8")
    assert (n.steps_range[1] - n.steps_range[0]) < (w.steps_range[1] - w.steps_range[0])


def test_a_varying_batch_is_recovered_step_by_step(tmp_path):
    # batch 8 for 150 steps, then 64; B_noise 32 throughout: dS_min = 150 / (1 + 4) + 150 / (1 + 0.5) = 130.
    path = write_run(tmp_path, noise=32.0, batch=lambda s: 8 if s <= 150 else 64, steps=300)
    p = plan(path, stretches=3, batches=[32], ramp=None)
    assert p.min_steps == pytest.approx(130.0, rel=0.03)
    assert p.min_examples == pytest.approx(32 * 130.0, rel=0.03)
    assert p.prediction("batch 32").steps == pytest.approx(130 * 2, rel=0.03)
    assert p.prediction("this run").steps == pytest.approx(300.0)
    assert (p.batch_min, p.batch_max) == (8.0, 64.0)


def test_plans_to_a_target_loss(tmp_path):
    path = write_run(tmp_path, noise=32.0, loss=lambda s: 1.0 - s / 500)  # loss 0.6 at step 200
    p = plan(path, target_loss=0.6, loss_window=32, stretches=4, batches=[64], ramp=None)
    assert (p.steps, p.examples) == (200, 6400)
    assert p.reached_loss == pytest.approx(0.6)
    assert p.min_steps == pytest.approx(200 / (1 + 32 / 32), rel=0.03)
    assert [round(r["loss"], 3) for r in p.by_loss][-1] == 0.6
    with pytest.raises(PlanError, match=r"never reached training loss 0.1 .*lowest 0.2"):
        plan(path, target_loss=0.1, loss_window=32)


def test_plan_accepts_an_open_reader_and_prices_more_schedules(tmp_path):
    path = write_run(tmp_path, noise=32.0)
    with open_run(path) as reader:
        p = plan(reader, batches=[], ramp=LinearRamp(8, 64, 5000.0), follow=(), schedules=[Replay([100.0], [16.0])])
    assert [q.name for q in p.predictions] == ["this run", "ramp 8->64 over 5,000 ex", "replay"]
    assert p.predict(Fixed(16)).steps == pytest.approx(predict(p.analysis.pieces(), Fixed(16)).steps)
    assert p.prediction("replay").steps == pytest.approx(p.predict(Fixed(16)).steps)


def test_to_dict_is_plain_json(tmp_path):
    import json

    from noisescale.cli.format import dumps_json

    p = plan(write_run(tmp_path, noise=32.0), stretches=4)
    doc = json.loads(dumps_json(p.to_dict()))
    assert set(doc) >= {"run", "reference", "model", "schedules", "stretches", "critical_batch", "warnings"}
    assert doc["model"]["critical_batch"] == pytest.approx(p.critical_batch)
    assert len(doc["stretches"]) == 4 and doc["stretches"][-1]["fraction_end"] == pytest.approx(1.0)


# -- the model's best schedule ---------------------------------------------------------------------------------


def test_frontier_fixed_and_following_lie_on_one_curve_and_sqrt_beats_it(tmp_path):
    path = write_run(tmp_path, noise=lambda s: 4.0 if s <= 200 else 400.0, spread=0.02)
    p = plan(path, stretches=4, batches=[16, 64], follow=(0.5, 2.0), ramp=None)
    s_min, e_min = p.min_steps, p.min_examples
    for q in p.predictions[1:]:
        assert (q.steps / s_min - 1) * (q.examples / e_min - 1) == pytest.approx(1.0, rel=1e-6)
    # batch c sqrt(B_noise) on each stretch: (S - S_min)(E - E_min) = A^2 < S_min E_min
    assert p.frontier**2 < 0.7 * s_min * e_min
    c = 3.0
    steps = sum(pc.min_steps + pc.min_examples / (c * math.sqrt(pc.b_noise)) for pc in p.analysis.pieces())
    examples = sum(pc.min_examples + c * math.sqrt(pc.b_noise) * pc.min_steps for pc in p.analysis.pieces())
    assert (steps - s_min) * (examples - e_min) == pytest.approx(p.frontier**2, rel=1e-6)
    assert p.best_steps(examples) == pytest.approx(steps, rel=1e-6)
    assert p.best_steps(e_min) is None


# -- refusals and warnings -------------------------------------------------------------------------------------


def test_refuses_a_run_too_short(tmp_path):
    path = write_run(tmp_path, noise=32.0, steps=12)
    with pytest.raises(PlanError, match=r"too short to plan from: 12 usable B_simple measurement\(s\), at least 20"):
        plan(path)


def test_refuses_a_run_too_noisy(tmp_path):
    # |G|^2 of 1 under a per-step spread of 20: over 40 steps a stretch cannot tell it from 0.
    path = write_run(tmp_path, noise=32.0, spread=20.0, steps=200)
    with pytest.raises(PlanError, match=r"too noisy to plan from: B_simple is undefined or its 90% band is unbounded"):
        plan(path, stretches=5)


def test_refuses_a_run_without_measurements_or_loss_for_a_target(tmp_path):
    with Run("empty", dir=tmp_path) as run:
        run.log(1, {"loss": 1.0})
    with pytest.raises(PlanError, match="no B_simple measurements"):
        plan(run.path)
    path = write_run(tmp_path, noise=32.0, loss=False)
    with pytest.raises(PlanError, match="no logged training loss"):
        plan(path, target_loss=0.5)
    p = plan(path)  # to the end of the run: fine, with a warning
    assert "no_loss" in [w.code for w in p.warnings]


def test_warnings_name_the_weak_spots(tmp_path):
    # batch 512 against B_noise 8 (far above), a short run, an undefined stretch (tr(Sigma) below 0 on steps 41-60).
    path = write_run(tmp_path, noise=lambda s: -8.0 if 41 <= s <= 60 else 8.0, batch=512, steps=80, spread=0.2)
    p = plan(path, stretches=4, batches=[4096 * 16])
    codes = {w.code: w for w in p.warnings}
    assert {"far_from_batch", "above_critical", "short_run", "undefined", "extrapolation"} <= set(codes)
    assert re.search(r"reached 512, 6\dx its critical batch E_min/S_min = 8", codes["above_critical"].message)
    assert codes["undefined"].fraction == pytest.approx(0.25)
    filled = [s for s in p.stretches if s.filled]
    assert [s.index for s in filled] == [2] and filled[0].b_simple == pytest.approx(8.0, rel=0.2)
    assert p.prediction(f"batch {4096 * 16}").extrapolated


def test_skipped_steps_count_as_training_not_as_measurements(tmp_path):
    path = write_run(tmp_path, noise=32.0, steps=100, status=lambda s: "skipped" if s % 4 == 0 else "ok")
    p = plan(path, stretches=2, batches=[32], ramp=None)
    assert p.steps == 100 and p.measured == 75
    assert [s.steps for s in p.stretches] == [50, 50] and [s.measured for s in p.stretches] == [38, 37]
    assert p.min_steps == pytest.approx(100 / 2, rel=0.03)


def test_stretches_merge_where_measurements_are_sparse(tmp_path):
    # measured only every 10th step: 30 measurements, 10 stretches wanted, at least 5 measurements each
    rows = rows_from_measurements(
        [
            {"step": s, "examples": 16 * s, "status": "ok", "trace_cov_raw": 32.0, "grad_sq_raw": 1.0}
            for s in range(10, 301, 10)
        ]
    )
    assert rows[0].steps == 10 and rows[0].examples_taken == 160
    st = cut_stretches(rows, 10, z=1.645)
    assert [s.measured for s in st] == [6] * 5
    assert sum(s.steps for s in st) == 300 and st[0].first_step == 1


def test_smooth_loss_against_a_plain_loop():
    rng = random.Random(1)
    ex, v, total = [], [], 0
    for _ in range(60):
        total += rng.choice([8, 16, 32])
        ex.append(float(total))
        v.append(rng.random())
    got = smooth_loss(ex, v, 100.0)
    for i in range(60):
        inside = [j for j in range(60) if abs(ex[j] - ex[i]) <= 50.0]
        w = [ex[j] - (ex[j - 1] if j else 0.0) for j in inside]
        assert got[i] == pytest.approx(sum(wj * v[j] for wj, j in zip(w, inside)) / sum(w))
    assert crossing([1, 2, 3], [0.5, 0.3, 0.1], 0.3) == 2 and crossing([1], [0.5], 0.1) is None


# -- a real tiny training --------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """A model this small trains fastest on one thread (and 60x slower on two when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plan_from_a_real_training(tmp_path, one_thread):
    torch.manual_seed(0)
    x = torch.randn(2048, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with Run("real", dir=tmp_path) as run:
        monitor = ns.GNSMonitor(model, run=run, per_layer=False)
        for step in range(1, 161):
            idx = torch.randint(0, 2048, (32,))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            monitor.step(batch_size=32)
            run.log(step, {"loss": loss})
            opt.step()
            opt.zero_grad()
        monitor.close()
    p = plan(run.path, batches=[8, 32, 128], follow=(1.0,), stretches=5)
    assert p.steps == 160 and p.measured == 160
    assert p.prediction("this run").steps == pytest.approx(160.0)
    assert p.prediction("batch 32").steps == pytest.approx(160.0)
    s = [p.prediction(f"batch {b}") for b in (8, 32, 128)]
    assert s[0].steps > s[1].steps > s[2].steps > p.min_steps  # more examples per step, fewer steps
    assert p.min_examples < s[0].examples < s[1].examples < s[2].examples
    assert all(st.b_simple is not None and st.b_simple > 0 for st in p.stretches)
    with open_run(run.path) as reader:
        a = analyse(reader, stretches=5)
    assert [st.b_simple for st in a.stretches] == [st.b_simple for st in p.stretches]


def test_bad_arguments_fail_before_reading(tmp_path):
    path = write_run(tmp_path, noise=32.0)
    for kw, match in [
        ({"stretches": 0}, "stretches must be a positive integer"),
        ({"loss_window": -1}, "loss_window must be a positive"),
        ({"target_loss": math.nan}, "target_loss must be a finite"),
        ({"confidence": 1.5}, "confidence must be a float"),
    ]:
        with pytest.raises(ns.ConfigError, match=match):
            plan(path, **kw)
    with pytest.raises(ns.ConfigError, match="max_batch must be >= min_batch"):
        plan(path, follow=(1.0,), min_batch=64, max_batch=8)
