"""The example source lets a layer's inputs go once its backward hook has used them, as autograd does with its own
saved tensors, and keeps them when the backward pass keeps the graph for another one."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import noisescale as ns


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 2))


def _inputs_of(model: nn.Sequential) -> list[weakref.ref]:
    refs: list[weakref.ref] = []
    for layer in (model[2], model[4]):
        layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    return refs


def test_inputs_are_let_go_during_backward_while_the_graph_lives():
    model = _model()
    refs = _inputs_of(model)
    monitor = ns.GNSMonitor(model, "example")
    loss = model(torch.randn(6, 4)).square().sum()  # `loss` keeps the graph (and its hooks) alive
    loss.backward()
    gc.collect()
    assert [r() for r in refs] == [None, None]  # autograd freed its copies, and the monitor let its go
    m = monitor.step(batch_size=6)
    assert m.coverage == 1.0 and m.trace_cov_raw is not None
    monitor.close()


def test_a_kept_graph_keeps_them_for_the_next_pass():
    model, reference = _model(), _model()
    monitor = ns.GNSMonitor(model, "example")
    x = torch.randn(6, 4)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()  # the same examples once more: every layer is measured in both passes
    m = monitor.step(batch_size=12)
    ref_monitor = ns.GNSMonitor(reference, "example")
    for _ in range(2):
        reference(x).square().sum().backward()  # two graphs of the same examples: what the kept graph must give
    want = ref_monitor.step(batch_size=12)
    assert m.trace_cov_raw == want.trace_cov_raw and m.grad_sq_raw == want.grad_sq_raw
    monitor.close()
    ref_monitor.close()
