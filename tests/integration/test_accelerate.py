"""``AccelerateMonitor`` in a loop under ``accelerator.accumulate``: the plain loop's numbers, checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.frameworks import assert_same_series, plain_series, regression_data, row, steps_of, tiny_net
from torch import nn

import noisescale as ns
from noisescale.errors import ConfigError

accelerate = pytest.importorskip("accelerate")
from noisescale.integrations.accelerate import AccelerateMonitor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = 4
LR = 0.2


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps process-wide state (its accumulation settings among it): start each test from none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    accumulation: int,
    clip: float | None = None,
    start: int = 0,
    stop: int | None = None,
    state: Path | None = None,
    save: Path | None = None,
    controller: Any = None,
    **kwargs: Any,
) -> tuple[list[ns.Measurement], Any]:
    """Steps ``start`` to ``stop`` of the loop of examples/accelerate_train.py, measured."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    rows: list[ns.Measurement] = []
    gns = AccelerateMonitor(accelerator, model, callbacks=[rows.append], **kwargs)
    accelerator.register_for_checkpointing(gns)
    if controller is not None:  # built with optimizer="later": the prepared optimizer's own torch optimizer
        controller.attach(opt.optimizer)
        accelerator.register_for_checkpointing(controller)
    if state is not None:
        accelerator.load_state(str(state))
    for i, (xb, yb) in enumerate(loader):
        if i < start * accumulation:
            continue
        if stop is not None and i >= stop * accumulation:
            break
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(xb), yb))
            m = gns.after_backward(len(xb))
            if m is not None and controller is not None:
                controller.step(m)  # its multiplier scales the opt.step() below
            if accelerator.sync_gradients and clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    if save is not None:
        accelerator.save_state(str(save))
    gns.close()
    return rows, gns


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_same_series_as_the_plain_loop(accumulation, clip):
    x, y = regression_data(n=24)
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    rows, _ = train(net, x, y, accumulation=accumulation, clip=clip)
    want, plain_net = plain_series(plain_net, steps_of(x, y, MICRO, accumulation), lr=LR, clip=clip)
    assert_same_series([row(m) for m in rows], want)
    assert {m.source for m in rows} == {"example" if accumulation == 1 else "microbatch"}
    for a, b in zip(net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_save_state_and_load_state_continue_exactly(tmp_path):
    x, y = regression_data(n=32)  # 4 steps of two micro-batches
    rules = ns.alerts.default_rules(channels=[])
    straight, _ = train(tiny_net(), x, y, accumulation=2, sinks=[rules])

    net = tiny_net()
    first, _ = train(
        net, x, y, accumulation=2, stop=2, save=tmp_path / "ckpt", sinks=[ns.alerts.default_rules(channels=[])]
    )
    rules2 = ns.alerts.default_rules(channels=[])
    rest, _ = train(tiny_net(seed=3), x, y, accumulation=2, start=2, state=tmp_path / "ckpt", sinks=[rules2])
    assert [m.step for m in rest] == [3, 4]
    assert_same_series([row(m) for m in first + rest], [row(m) for m in straight], rel=1e-12)
    assert rules2.state_dict()["history"] == rules.state_dict()["history"]


class RunRecorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def event(self, kind: str, message: str = "", *, step: int | None = None, data: Any = None) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))


def test_a_controller_is_saved_and_loaded_with_the_monitor(tmp_path):
    x, y = regression_data(n=32)  # 4 steps of two micro-batches

    def controller(run: RunRecorder) -> ns.BatchSizeController:
        return ns.BatchSizeController(
            "constant", batch_size=2 * MICRO, base_batch=1, lr_rule="adascale", optimizer="later", run=run
        )

    straight_run, first_run, rest_run = RunRecorder(), RunRecorder(), RunRecorder()
    straight_net = tiny_net()
    straight, _ = train(straight_net, x, y, accumulation=2, controller=(c0 := controller(straight_run)))
    first, _ = train(tiny_net(), x, y, accumulation=2, stop=2, save=tmp_path / "ckpt", controller=controller(first_run))
    net = tiny_net(seed=3)
    rest, _ = train(
        net, x, y, accumulation=2, start=2, state=tmp_path / "ckpt", controller=(c2 := controller(rest_run))
    )
    assert_same_series([row(m) for m in first + rest], [row(m) for m in straight], rel=1e-12)
    assert first_run.metrics + rest_run.metrics == straight_run.metrics  # lr_scale and the lr each step used
    assert len({m["lr_scale"] for _, m in straight_run.metrics if "lr_scale" in m}) > 1
    assert c2.state_dict() == c0.state_dict()
    for a, b in zip(net.parameters(), straight_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match=r"accelerate\.Accelerator"):
        AccelerateMonitor(object(), tiny_net())
    accelerator = accelerate.Accelerator(cpu=True)
    gns = AccelerateMonitor(accelerator, tiny_net())
    with pytest.raises(ConfigError, match="positive int"):
        gns.after_backward(0)
    gns.close()


def test_an_accelerate_version_outside_the_range_fails_at_construction(monkeypatch):
    from noisescale.integrations._versions import FrameworkVersionError

    monkeypatch.setattr(accelerate, "__version__", "0.34.2")
    with pytest.raises(FrameworkVersionError, match=r"supports accelerate>=1\.0,<2, found accelerate 0\.34\.2"):
        AccelerateMonitor(accelerate.Accelerator(cpu=True), tiny_net())


def test_the_accelerators_grad_scaler_reaches_the_monitor(monkeypatch):
    accelerator = accelerate.Accelerator(cpu=True)  # no GradScaler on the CPU: the wiring is what is checked
    scaler = torch.amp.GradScaler("cpu")
    monkeypatch.setattr(accelerator, "scaler", scaler)
    gns = AccelerateMonitor(accelerator, tiny_net())
    assert gns.monitor.scaler is scaler
    gns.close()


def test_precondition_measures_adams_noise_scale():
    x, y = regression_data(n=64)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = tiny_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    rows: list[ns.Measurement] = []
    gns = AccelerateMonitor(accelerator, model, callbacks=[rows.append], precondition=opt)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(xb), yb))
            gns.after_backward(len(xb))
            opt.step()
            opt.zero_grad()
    gns.close()
    assert len(rows) == 8
    assert [m.b_precond is None for m in rows] == [True] * 5 + [False] * 3  # Adam's warm-up, then measured
    assert rows[-1].preconditioned.status == "ok"
