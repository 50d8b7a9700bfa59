"""The example source under activation checkpointing and activation offloading.

Checkpointed blocks free their activations after the forward pass and recompute them in the backward pass; the
collector must give the same numbers as without checkpointing, and must not keep those activations alive.
"""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import noisescale as ns


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.ln(x))))


class Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(8) for _ in range(3))
        self.head = nn.Linear(8, 3)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.mode == "plain":
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.head(x).mean(1)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Reentrant checkpointing needs an input that requires grad to reach the blocks' parameters.
    return torch.randn(6, 5, 8, generator=g, dtype=torch.float64).requires_grad_(), torch.randint(
        0, 3, (6,), generator=g
    )


def _measure(mode: str, offload: bool = False) -> list[float | None]:
    torch.manual_seed(0)
    net = Net(mode).double()
    monitor = ns.GNSMonitor(net, source="example")
    x, y = _data()
    if offload:
        with torch.autograd.graph.save_on_cpu():
            loss = nn.functional.cross_entropy(net(x), y)
    else:
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    m = monitor.step(batch_size=6)
    monitor.close()
    rows = [m, *m.layers.values()]
    return [v for row in rows for v in (row.grad_sq_raw, row.trace_cov_raw)]


@pytest.mark.parametrize(("mode", "offload"), [("nonreentrant", False), ("reentrant", False), ("plain", True)])
def test_same_measurement_as_without_checkpointing(mode: str, offload: bool) -> None:
    plain = _measure("plain")
    assert len(plain) == 2 * (1 + 3 * 6 + 2) and all(v is not None for v in plain)
    assert _measure(mode, offload) == pytest.approx(plain, rel=1e-9)


@pytest.mark.parametrize("with_monitor", [False, True], ids=["plain", "monitor"])
def test_checkpointed_activations_are_not_kept_alive(with_monitor: bool) -> None:
    """After the forward pass a checkpointed block's inner activations are gone, monitor or not."""
    torch.manual_seed(0)
    net = Net("nonreentrant").double()
    monitor = ns.GNSMonitor(net, source="example") if with_monitor else None
    inner: list[weakref.ref[torch.Tensor]] = []
    probe = net.blocks[1].fc2.register_forward_hook(lambda mod, inputs, out: inner.append(weakref.ref(inputs[0])))
    x, y = _data()
    loss = nn.functional.cross_entropy(net(x), y)
    gc.collect()
    assert len(inner) == 1 and inner[0]() is None, "fc2's input outlived the checkpointed forward pass"
    probe.remove()
    loss.backward()  # recomputes the block
    if monitor is not None:
        assert monitor.step(batch_size=6).trace_cov_raw is not None
        monitor.close()


def test_nothing_outlives_the_step() -> None:
    """The saving nodes die with the graph: no reference cycle through autograd's C++ nodes accumulates."""
    from noisescale.collectors.saved_inputs import SavedInputs

    torch.manual_seed(0)
    net = Net("nonreentrant").double()
    monitor = ns.GNSMonitor(net, source="example")
    for _ in range(3):
        x, y = _data()
        nn.functional.cross_entropy(net(x), y).backward()
        monitor.step(batch_size=6)
        net.zero_grad(set_to_none=True)
    gc.collect()
    assert sum(type(o) is SavedInputs for o in gc.get_objects()) == 0
    monitor.close()
