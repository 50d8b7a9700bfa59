"""``NoiseScaleCallback`` in ``lightning.pytorch``: the plain loop's numbers, logging, checkpoints, versions."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.frameworks import assert_same_series, plain_series, regression_data, row, steps_of, tiny_net
from torch import nn

import noisescale as ns
from noisescale.errors import ConfigError

L = pytest.importorskip("lightning.pytorch")
from tests.helpers.lightning_modules import Regression  # noqa: E402

from noisescale.integrations.lightning import NoiseScaleCallback  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's advice on workers and logging intervals
]

MICRO = 4  # rows per Lightning batch
LR = 0.2


def loader(x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO, shuffle=False)


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": tmp_path,
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def fit_rows(tmp_path: Path, net: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> list[dict[str, Any]]:
    rows: list[ns.Measurement] = []
    cb = NoiseScaleCallback(callbacks=[rows.append])
    trainer(tmp_path, [cb], **kwargs).fit(Regression(net, LR), loader(x, y))
    return [row(m) for m in rows]  # the monitor was closed when fit ended: every measurement is delivered


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_same_series_as_the_plain_loop(tmp_path, accumulation, clip):
    x, y = regression_data(n=24)  # 6 batches: 6 steps, or 3 of two micro-batches
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    got = fit_rows(tmp_path, net, x, y, accumulate_grad_batches=accumulation, gradient_clip_val=clip)
    want, plain_net = plain_series(plain_net, steps_of(x, y, MICRO, accumulation), lr=LR, clip=clip)
    assert_same_series(got, want)
    assert [r["source"] for r in got] == ["example" if accumulation == 1 else "microbatch"] * len(got)
    assert all(r["status"] == "ok" for r in got)
    # the clipping did happen in both loops (it shows in the weights, not in what was measured)
    for a, b in zip(net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_changes_the_weights_not_the_measurement(tmp_path):
    x, y = regression_data(n=8)
    nets = [tiny_net(), tiny_net()]
    series = [
        fit_rows(tmp_path, net, x, y, gradient_clip_val=clip, accumulate_grad_batches=2)
        for net, clip in zip(nets, [None, 1e-3])
    ]
    assert series[0][0] == series[1][0]  # one step: what backward produced, before the clipping
    assert not torch.allclose(nets[0][0].weight, nets[1][0].weight)


def test_logs_through_the_trainers_loggers_at_its_cadence(tmp_path):
    x, y = regression_data(n=32)
    rows: list[ns.Measurement] = []
    cb = NoiseScaleCallback(callbacks=[rows.append], prog_bar=True)
    logger = L.loggers.CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [cb], logger=logger, log_every_n_steps=2, max_epochs=1)
    t.fit(Regression(tiny_net(), LR), loader(x, y))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("noisescale/b_simple")]
    by_step = {m.step: m for m in rows}
    # Lightning numbers its logged steps from 0: the monitor's step s is the trainer's step s - 1.
    assert [int(r["step"]) + 1 for r in logged] == [2, 4, 6, 8]
    for r in logged:
        m = by_step[int(r["step"]) + 1]
        assert math.isclose(float(r["noisescale/b_simple"]), m.b_simple, rel_tol=1e-6)
        assert math.isclose(float(r["noisescale/band/low"]), m.b_simple_low, rel_tol=1e-6)
        assert float(r["noisescale/batch_size"]) == MICRO
    assert "noisescale/b_simple" in t.progress_bar_metrics


def test_run_store_gets_measurements_and_the_loss(tmp_path):
    x, y = regression_data(n=16)
    cb = NoiseScaleCallback(run=tmp_path / "runs", run_name="lit", run_config={"lr": LR})
    trainer(tmp_path, [cb]).fit(Regression(tiny_net(), LR), loader(x, y))
    assert cb.run.closed
    with ns.open_run(cb.run.path) as reader:
        assert reader.info.status == "finished"
        assert reader.info.config == {"lr": LR}
        assert len(reader.series("b_simple")) == 4
        loss = reader.metric("loss")
        assert len(loss.value) == 4 and all(v > 0 for v in loss.value)


def test_checkpoint_and_resume_continue_exactly(tmp_path):
    x, y = regression_data(n=16)  # 4 steps an epoch
    rules = ns.alerts.default_rules(channels=[])
    straight: list[ns.Measurement] = []
    cb = NoiseScaleCallback(callbacks=[straight.append], sinks=[rules])
    trainer(tmp_path, [cb], max_epochs=2).fit(Regression(tiny_net(), LR), loader(x, y))

    first: list[ns.Measurement] = []
    cb1 = NoiseScaleCallback(callbacks=[first.append], sinks=[ns.alerts.default_rules(channels=[])])
    t1 = trainer(tmp_path, [cb1], max_epochs=1)
    t1.fit(Regression(tiny_net(), LR), loader(x, y))
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    resumed: list[ns.Measurement] = []
    rules2 = ns.alerts.default_rules(channels=[])
    cb2 = NoiseScaleCallback(callbacks=[resumed.append], sinks=[rules2])
    trainer(tmp_path, [cb2], max_epochs=2).fit(Regression(tiny_net(seed=5), LR), loader(x, y), ckpt_path=ckpt)

    assert [m.step for m in resumed] == [5, 6, 7, 8]
    assert_same_series([row(m) for m in first + resumed], [row(m) for m in straight], rel=1e-12)
    assert cb2.monitor.state_dict()["examples"] == cb.monitor.state_dict()["examples"] == 32
    assert rules2.state_dict()["history"] == rules.state_dict()["history"]


def test_a_skipped_training_step_is_not_measured(tmp_path):
    class SkipsSecond(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    x, y = regression_data(n=12)
    rows: list[ns.Measurement] = []
    trainer(tmp_path, [NoiseScaleCallback(callbacks=[rows.append])]).fit(SkipsSecond(tiny_net(), LR), loader(x, y))
    assert [m.step for m in rows] == [1, 2]
    assert [m.examples for m in rows] == [4, 8]


def test_batch_size_fn_counts_the_examples(tmp_path):
    x, y = regression_data(n=8)
    rows: list[ns.Measurement] = []
    cb = NoiseScaleCallback(callbacks=[rows.append], batch_size_fn=lambda batch: len(batch[1]))
    trainer(tmp_path, [cb]).fit(Regression(tiny_net(), LR), loader(x, y))
    assert [m.batch_size for m in rows] == [MICRO, MICRO]


def test_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="source must be one of"):
        NoiseScaleCallback(source="examples")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="halflife"):
        NoiseScaleCallback(halflife=-1)
    with pytest.raises(ConfigError, match="not a sink"):
        NoiseScaleCallback(sinks=[object()])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="log_columns"):
        NoiseScaleCallback(log_columns=["bsimple"])
    with pytest.raises(ConfigError, match="loss_couples_examples"):
        NoiseScaleCallback(source="example", loss_couples_examples=True)


def test_a_lightning_version_outside_the_range_fails_at_construction(monkeypatch):
    import lightning

    from noisescale.integrations._versions import FrameworkVersionError

    monkeypatch.setattr(lightning, "__version__", "1.9.5")
    with pytest.raises(FrameworkVersionError, match=r"supports lightning>=2\.2,<3, found lightning 1\.9\.5"):
        NoiseScaleCallback()
    monkeypatch.setattr(lightning, "__version__", "3.0.0")
    with pytest.raises(FrameworkVersionError, match="pip install"):
        NoiseScaleCallback()


def test_strategies_it_cannot_measure_are_refused():
    from noisescale.integrations.lightning import _check_strategy

    class FakeTrainer:
        strategy = object()  # e.g. FSDPStrategy's flat sharded parameters

    with pytest.raises(ConfigError, match="single-device and DDP"):
        _check_strategy(FakeTrainer())


def test_a_grad_scaler_is_unscaled_as_in_the_plain_loop(tmp_path):
    """float16 autocast with a GradScaler (Lightning's 16-mixed plugin, on the CPU here): |G|^2 and tr(Sigma) are
    reported unscaled, as by a plain loop that passes the same scaler to the monitor."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    x, y = regression_data(n=16)
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    rows: list[ns.Measurement] = []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    t = trainer(
        tmp_path,
        [NoiseScaleCallback(callbacks=[rows.append])],
        plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)],
        accumulate_grad_batches=2,
    )
    t.fit(Regression(net, LR), loader(x, y))

    plain_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.SGD(plain_net.parameters(), lr=LR)
    want = []
    with ns.GNSMonitor(plain_net, scaler=plain_scaler) as monitor:
        for step in steps_of(x, y, MICRO, 2):
            for xb, yb in step:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.mse_loss(plain_net(xb), yb)
                plain_scaler.scale(loss / len(step)).backward()
            want.append(row(monitor.step(batch_size=sum(len(xb) for xb, _ in step))))
            plain_scaler.step(opt)
            plain_scaler.update()
            opt.zero_grad()
    assert_same_series([row(m) for m in rows], want, rel=1e-6)
    assert all(m.grad_sq_raw is not None and abs(m.grad_sq_raw) < 1e3 for m in rows)  # not times 2^20


class AdamRegression(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_precondition_measures_adams_noise_scale_as_the_plain_loop(tmp_path):
    x, y = regression_data(n=64)  # 8 steps of two micro-batches: past Adam's warm-up
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    rows: list[ns.Measurement] = []
    cb = NoiseScaleCallback(callbacks=[rows.append], precondition=True)
    logger = L.loggers.CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], accumulate_grad_batches=2, logger=logger, log_every_n_steps=1).fit(
        AdamRegression(net, LR), loader(x, y)
    )
    opt = torch.optim.Adam(plain_net.parameters(), lr=0.01)
    monitor = ns.GNSMonitor(plain_net, "microbatch", precondition=opt)
    want = []
    for step in steps_of(x, y, MICRO, 2):
        for xb, yb in step:
            (nn.functional.mse_loss(plain_net(xb), yb) / 2).backward()
        want.append(monitor.step(2 * MICRO))
        opt.step()
        opt.zero_grad()
    assert len(rows) == len(want) == 8
    for got, ref in zip(rows, want, strict=True):
        assert (got.b_precond is None) == (ref.b_precond is None)
        if ref.b_precond is not None:
            assert math.isclose(got.b_precond, ref.b_precond, rel_tol=1e-5)
    assert rows[-1].b_precond is not None
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("noisescale/b_precond")]
    assert logged and math.isclose(float(logged[-1]["noisescale/b_precond"]), rows[-1].b_precond, rel_tol=1e-6)


def test_precondition_with_sgd_is_refused_when_training_starts(tmp_path):
    x, y = regression_data(n=16)
    cb = NoiseScaleCallback(precondition=True, source="microbatch")
    with pytest.raises(ConfigError, match="SGD does not keep"):
        trainer(tmp_path, [cb], accumulate_grad_batches=2).fit(Regression(tiny_net(), LR), loader(x, y))
