"""``NoiseScaleTrainerCallback(controller=)``: learning-rate coupling as in the plain loop, checkpoints, refusals."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.frameworks import assert_same_series, regression_data, row, tiny_net
from torch import nn

import noisescale as ns
from noisescale.errors import ConfigError

transformers = pytest.importorskip("transformers")
from tests.integration.test_huggingface import MICRO, Recorder, Regression, Rows, arguments, steps  # noqa: E402

from noisescale.integrations.huggingface import NoiseScaleTrainerCallback  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

LR = 0.05


class RunRecorder:
    """A run stand-in: the controller's events and metrics, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int | None, Any]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def event(self, kind: str, message: str = "", *, step: int | None = None, data: Any = None) -> None:
        self.events.append((kind, message, step, data))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))


def adascale(batch: int, run: Any = None) -> ns.BatchSizeController:
    """A fixed batch, the learning rate tuned for one example: the gain follows the measured noise scale."""
    return ns.BatchSizeController(
        "constant", batch_size=batch, base_batch=1, lr_rule="adascale", optimizer="later", run=run
    )


def train(
    tmp_path: Path, net: nn.Module, x: torch.Tensor, y: torch.Tensor, cb: Any, resume: str | None = None, **kwargs: Any
) -> tuple[Recorder, Any]:
    recorder = Recorder()
    trainer = transformers.Trainer(
        model=Regression(net),
        args=arguments(tmp_path, learning_rate=LR, **kwargs),
        train_dataset=Rows(x, y),
        callbacks=[cb, recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return recorder, trainer


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])
def test_learning_rate_coupling_equals_the_plain_loops(tmp_path, accumulation, clip):
    x, y = regression_data(n=24)
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    got_run, want_run = RunRecorder(), RunRecorder()
    rows: list[ns.Measurement] = []
    cb = NoiseScaleTrainerCallback(callbacks=[rows.append], controller=adascale(MICRO * accumulation, got_run))
    recorder, _ = train(tmp_path, net, x, y, cb, gradient_accumulation_steps=accumulation, max_grad_norm=clip)

    # the plain loop replays the batches the Trainer drew, with the same controller on plain SGD
    opt = torch.optim.SGD(plain_net.parameters(), lr=LR)
    ctrl = adascale(MICRO * accumulation, want_run)
    ctrl.attach(opt)
    want = []
    with ns.GNSMonitor(plain_net) as monitor:
        for step in steps(recorder, accumulation):
            for xb, yb in step:
                (nn.functional.mse_loss(plain_net(xb), yb) / len(step)).backward()
            m = monitor.step(batch_size=sum(len(xb) for xb, _ in step))
            want.append(row(m))
            ctrl.step(m)
            if clip:
                nn.utils.clip_grad_norm_(plain_net.parameters(), clip)
            opt.step()
            opt.zero_grad()

    assert_same_series([row(m) for m in rows], want)
    assert got_run.metrics == want_run.metrics  # lr_scale, accumulation and the lr each step used
    scales = [m["lr_scale"] for _, m in got_run.metrics if "lr_scale" in m]
    assert len(set(scales)) > 1 and all(s > 1.0 for s in scales[1:])  # the gain moved with the noise scale
    for a, b in zip(net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpoint_and_resume_restore_monitor_and_controller_exactly(tmp_path):
    x, y = regression_data(n=24)  # 6 steps; a checkpoint after step 2
    common = {"save_strategy": "steps", "save_steps": 2}

    straight_run = RunRecorder()
    cb0 = NoiseScaleTrainerCallback(controller=adascale(MICRO, straight_run))
    train(tmp_path / "a", tiny_net(), x, y, cb0, **common)

    resumed_run = RunRecorder()
    cb1 = NoiseScaleTrainerCallback(controller=adascale(MICRO, resumed_run))
    checkpoint = str(tmp_path / "a" / "out" / "checkpoint-2")
    _, t1 = train(tmp_path / "a", tiny_net(seed=3), x, y, cb1, resume=checkpoint, **common)
    assert t1.state.global_step == 6
    assert resumed_run.metrics == [(s, m) for s, m in straight_run.metrics if s > 2]
    assert cb1.controller.state_dict() == cb0.controller.state_dict()
    assert cb1.monitor.state_dict()["examples"] == cb0.monitor.state_dict()["examples"] == 24


def test_a_controller_that_changes_the_batch_is_refused_at_construction():
    with pytest.raises(ConfigError, match=r"learning rate only.*'constant'"):
        NoiseScaleTrainerCallback(
            controller=ns.BatchSizeController("gns", min_batch=4, max_batch=64, micro_batch=4, optimizer="later")
        )
    with pytest.raises(ConfigError, match="optimizer='later'"):
        NoiseScaleTrainerCallback(
            controller=ns.BatchSizeController("constant", batch_size=4, lr_rule="sqrt", base_batch=1, base_lr=0.1)
        )


def test_a_batch_other_than_the_trainers_is_refused_when_training_starts(tmp_path):
    x, y = regression_data(n=8)
    cb = NoiseScaleTrainerCallback(controller=adascale(3 * MICRO))
    with pytest.raises(ConfigError, match=f"batch_size={2 * MICRO}"):
        train(tmp_path, tiny_net(), x, y, cb, gradient_accumulation_steps=2)
