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
    if state is not None:
        accelerator.load_state(str(state))
    for i, (xb, yb) in enumerate(loader):
        if i < start * accumulation:
            continue
        if stop is not None and i >= stop * accumulation:
            break
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(xb), yb))
            gns.after_backward(len(xb))
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
