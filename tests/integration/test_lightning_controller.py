"""``NoiseScaleCallback(controller=)``: the plain loop's decisions, the safe points, checkpoints, bad combinations.

The reference is a plain loop that drives the same controller over the same micro-batches in the same order and
applies Lightning's rule for a new accumulation: it starts only where the batches done in the epoch are a multiple
of it (or at an epoch's start); a decision that falls elsewhere is held and made again at the next step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.frameworks import assert_same_series, regression_data, row, tiny_net
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

MICRO = 4
LR = 0.1


class Recorder:
    """A run stand-in: the controller's events and metrics, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int | None, Any]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def event(self, kind: str, message: str = "", *, step: int | None = None, data: Any = None) -> None:
        self.events.append((kind, message, step, data))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))


class Held:
    """What the reference gives the controller at a step where the new accumulation cannot start."""

    status = "deferred"

    def __init__(self, m: ns.Measurement, reason: str) -> None:
        self.m, self.undefined_reason = m, reason

    def __getattr__(self, name: str) -> Any:
        return getattr(self.m, name)


def step_schedule(run: Any = None, **kwargs: Any) -> ns.BatchSizeController:
    """Milestones that fall both at safe points and between them (12 batches an epoch)."""
    options: dict[str, Any] = {
        "batch_size": MICRO,
        "micro_batch": MICRO,
        # 12 examples = 3 batches: accumulation 2 must wait for batch 4; 40 examples: 4 more batches in, from 2 to 4
        # at a batch count of 10 (not a multiple of 4): waits to the epoch's end.
        "milestones": ((12, 2 * MICRO), (40, 4 * MICRO), (96, MICRO)),
        "lr_rule": "sqrt",
        "optimizer": "later",
        "run": run,
    }
    options.update(kwargs)
    return ns.BatchSizeController("step", **options)


def gns_controller(run: Any = None, **kwargs: Any) -> ns.BatchSizeController:
    options: dict[str, Any] = {
        "min_batch": MICRO,
        "max_batch": 4 * MICRO,
        "micro_batch": MICRO,
        "k": 4.0,
        "use_band": False,
        "hysteresis": 0.0,
        "lr_rule": "adascale",
        "optimizer": "later",
        "run": run,
    }
    options.update(kwargs)
    return ns.BatchSizeController("gns", **options)


def fit(
    tmp_path: Path, net: nn.Module, ctrl: ns.BatchSizeController, x: torch.Tensor, y: torch.Tensor, **kwargs: Any
) -> tuple[list[dict[str, Any]], Any, NoiseScaleCallback]:
    rows: list[ns.Measurement] = []
    cb = NoiseScaleCallback(source="example", callbacks=[rows.append], controller=ctrl)
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": tmp_path,
        "callbacks": [cb],
    }
    ckpt = kwargs.pop("ckpt_path", None)
    options.update(kwargs)
    trainer = L.Trainer(**options)
    trainer.fit(Regression(net, LR), loader(x, y), ckpt_path=ckpt)
    return [row(m) for m in rows], trainer, cb


def loader(x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO, shuffle=False)


def plain_loop(
    net: nn.Module, ctrl: ns.BatchSizeController, x: torch.Tensor, y: torch.Tensor, epochs: int
) -> tuple[list[dict[str, Any]], list[int]]:
    """The reference: rows of the measurements and the accumulation each step ran with."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    ctrl.attach(opt)
    batches = [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, len(x), MICRO)]
    rows, used = [], []
    with ns.GNSMonitor(net, source="example") as monitor:
        for _ in range(epochs):
            done = 0
            while done < len(batches):
                k = ctrl.accumulation
                assert k is not None
                step = batches[done : done + k]
                for xb, yb in step:
                    (nn.functional.mse_loss(net(xb), yb) / k).backward()  # Lightning divides by k, short step too
                done += len(step)
                m = monitor.step(batch_size=sum(len(xb) for xb, _ in step))
                rows.append(row(m))
                used.append(k)
                decision, _ = ctrl.config.update(m, ctrl.state)
                new = ctrl.config.accumulation(decision.batch_size)
                assert new is not None
                if new != k and done < len(batches) and done % new:
                    ctrl.step(Held(m, f"waits: {done} batches, accumulation {new}"))
                else:
                    ctrl.step(m)
                opt.step()
                opt.zero_grad()
    ctrl.close()
    return rows, used


def changes(run: Recorder) -> list[tuple[int | None, int, int]]:
    return [(step, d["before"]["batch_size"], d["after"]["batch_size"]) for _, _, step, d in run.events]


@pytest.mark.parametrize("make", [step_schedule, gns_controller], ids=["step-schedule", "gns-adascale"])
def test_decisions_and_learning_rates_equal_the_plain_loops(tmp_path, make):
    x, y = regression_data(n=12 * MICRO)
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    got_run, want_run = Recorder(), Recorder()
    got, trainer, _ = fit(tmp_path, net, make(got_run), x, y)
    want, used = plain_loop(plain_net, make(want_run), x, y, epochs=2)

    assert_same_series(got, want, rel=1e-9)
    assert got_run.events and [e[:3] for e in got_run.events] == [e[:3] for e in want_run.events]
    assert [e[3] for e in got_run.events] == [e[3] for e in want_run.events]
    assert got_run.metrics == want_run.metrics  # lr (as the optimizer step used it), lr_scale, accumulation
    assert len(set(used)) > 1  # the accumulation did change (12 batches an epoch: every step is whole)
    assert [r["batch_size"] for r in got] == [k * MICRO for k in used]
    # the learning rate coupling was applied to the weights, step for step as in the plain loop
    for a, b in zip(net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert trainer.accumulate_grad_batches == trainer.callbacks[0].controller.accumulation


def test_a_change_between_safe_points_waits_for_the_next_one(tmp_path):
    x, y = regression_data(n=12 * MICRO)
    run = Recorder()
    got, _, _ = fit(tmp_path, tiny_net(), step_schedule(run), x, y, max_epochs=1)
    # Milestone at 12 examples (after batch 3): accumulation 2 starts after batch 4, the first even count.
    # Milestone at 40 examples (step 7, batch 10): accumulation 4 cannot start at 10; at 12 the epoch ends (step 8).
    assert [r["batch_size"] for r in got] == [4, 4, 4, 4, 8, 8, 8, 8]
    assert changes(run) == [(4, MICRO, 2 * MICRO), (8, 2 * MICRO, 4 * MICRO)]
    held = [m for s, m in run.metrics if s in (3, 7)]  # held steps keep their batch's multiplier
    assert held == [
        {"lr_scale": 1.0, "accumulation": 1.0},
        {"lr": LR},
        {"lr_scale": math.sqrt(2), "accumulation": 2.0},
        {"lr": pytest.approx(LR * math.sqrt(2))},
    ]


def test_decisions_reach_the_run_store_through_the_monitor(tmp_path):
    x, y = regression_data(n=12 * MICRO)
    cb = NoiseScaleCallback(source="example", run=tmp_path / "runs", controller=step_schedule())
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[cb],
    )
    trainer.fit(Regression(tiny_net(), LR), loader(x, y))
    with ns.open_run(cb.run.path) as reader:
        events = [e for e in reader.events() if e["kind"] == "controller"]
        assert [
            (e["step"], e["data"]["before"]["accumulation"], e["data"]["after"]["accumulation"]) for e in events
        ] == [
            (4, 1, 2),
            (8, 2, 4),
        ]
        lr = reader.metric("lr")
        assert len(lr.value) == 8
        assert math.isclose(lr.value[-1], LR * math.sqrt(2)), lr.value  # step 8 ran at batch 8 (sqrt rule)
        assert reader.metric("accumulation").value[-1] == 2.0


def test_checkpoint_and_resume_restore_monitor_and_controller_exactly(tmp_path):
    x, y = regression_data(n=12 * MICRO)
    straight_run = Recorder()
    straight, _, cb = fit(tmp_path, tiny_net(), gns_controller(straight_run), x, y, max_epochs=3)

    first_run = Recorder()
    first, t1, _ = fit(tmp_path, tiny_net(), gns_controller(first_run), x, y, max_epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    assert t1.accumulate_grad_batches > 1  # the resumed trainer must not start again from 1

    resumed_run = Recorder()
    ctrl2 = gns_controller(resumed_run)
    resumed, _, cb2 = fit(tmp_path, tiny_net(seed=5), ctrl2, x, y, max_epochs=3, ckpt_path=ckpt)
    assert resumed[0]["step"] == first[-1]["step"] + 1
    assert_same_series(first + resumed, straight, rel=1e-12)
    assert first_run.events + resumed_run.events == straight_run.events
    assert first_run.metrics + resumed_run.metrics == straight_run.metrics
    assert ctrl2.state_dict() == cb.controller.state_dict()
    assert cb2.monitor.state_dict()["examples"] == cb.monitor.state_dict()["examples"]


def test_bad_combinations_fail_at_construction_naming_the_fix():
    opt = torch.optim.SGD(tiny_net().parameters(), lr=LR)
    with pytest.raises(ConfigError, match="micro_batch="):
        NoiseScaleCallback(controller=ns.BatchSizeController("gns", max_batch=16, optimizer="later"))
    with pytest.raises(ConfigError, match="optimizer='later'"):
        NoiseScaleCallback(controller=gns_controller(optimizer=opt))
    with pytest.raises(ConfigError, match="optimizer='later'"):
        NoiseScaleCallback(controller=gns_controller(optimizer=None, base_lr=0.1))
    with pytest.raises(ConfigError, match="stall"):
        NoiseScaleCallback(controller=gns_controller(stall=ns.controllers.Stall(patience=10, duration=10)))
    with pytest.raises(ConfigError, match="source='example'"):
        NoiseScaleCallback(source="microbatch", controller=gns_controller())
    with pytest.raises(ConfigError, match="source='example'"):
        NoiseScaleCallback(controller=gns_controller(batch_size=2 * MICRO))  # auto would keep micro-batches
    with pytest.raises(ConfigError, match=r"ns\.BatchSizeController"):
        NoiseScaleCallback(controller=object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"accumulate_grad_batches": 3}, "leave accumulate_grad_batches at 1"),
        ({"devices": 1, "ctrl": {"world_size": 2, "min_batch": 2 * MICRO, "max_batch": 8 * MICRO}}, "world_size=1"),
        ({"ctrl": {"micro_batch": 2 * MICRO, "batch_size": 2 * MICRO, "min_batch": 2 * MICRO}}, "micro_batch="),
    ],
    ids=["accumulation-set", "world-size", "micro-batch"],
)
def test_combinations_only_the_trainer_shows_fail_when_fit_starts(tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    x, y = regression_data(n=4 * MICRO)
    ctrl = gns_controller(**kwargs.pop("ctrl", {}))
    with pytest.raises(ConfigError, match=match):
        fit(tmp_path, tiny_net(), ctrl, x, y, max_epochs=1, **kwargs)
