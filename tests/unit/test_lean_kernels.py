"""The lean kernels against their slow references: bounded buffers (forms in chunks), convolutions without im2col,
and the operators a measured step launches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import noisescale as ns
from noisescale.collectors.rules import linear_forms
from noisescale.collectors.rules.conv import (
    conv_grouped_weight_sq_norms,
    conv_layer_weight_sq_norms,
    conv_patches,
    conv_sketched_sq_norms,
    conv_weight_sq_norms,
)
from noisescale.collectors.rules.linear import sequence_linear_sq_norms
from noisescale.collectors.rules.sketch import Sketch, use_sketch

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
]


def _per_example_weight(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The slow reference: ``|sum_t g_t x_t^T|^2`` example by example, in float64."""
    return torch.stack([(gi.double().T @ xi.double()).square().sum() for xi, gi in zip(x, g)])


@pytest.mark.parametrize(("t", "m", "n"), [(40, 64, 64), (3, 30, 40), (50, 7, 300)])
def test_forms_in_chunks_equal_the_whole(monkeypatch, t, m, n):
    """Ghost (t=40), materialised (t=3) and, with one example above the limit, rows within an example."""
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(5, t, m, generator=gen, dtype=torch.float64)
    g = torch.randn(5, t, n, generator=gen, dtype=torch.float64)
    whole, bias = sequence_linear_sq_norms(x, g, with_bias=True)
    for limit in (2 * t * t + 1, 2 * t * t - 1, n * m // 3, 17):  # a few examples, one, rows of one, tiny
        monkeypatch.setattr(linear_forms, "MAX_BUFFER", limit)
        chunked, chunked_bias = sequence_linear_sq_norms(x, g, with_bias=True)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0.0)
        assert chunked_bias is not None and bias is not None
        torch.testing.assert_close(chunked_bias, bias, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(linear_forms.ghost_sq_norms(x, g), _per_example_weight(x, g), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            linear_forms.materialised_sq_norms(x, g), _per_example_weight(x, g), rtol=1e-12, atol=0
        )
    torch.testing.assert_close(whole, _per_example_weight(x, g), rtol=1e-12, atol=0.0)


def test_sketch_in_chunks_draws_the_same_projection(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 20, 48, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 20, 24, generator=gen, dtype=torch.float64)
    sketch = Sketch(4)
    sketch.begin(3)
    whole = linear_forms.sketched_sq_norms(x, g, sketch)
    monkeypatch.setattr(linear_forms, "MAX_BUFFER", 24 * 4 * 2)  # two examples a chunk
    sketch.begin(3)
    torch.testing.assert_close(linear_forms.sketched_sq_norms(x, g, sketch), whole, rtol=1e-12, atol=0.0)
    # the other side projected (m < n): chunks too
    sketch.begin(3)
    other = linear_forms.sketched_sq_norms(g, x, sketch)
    monkeypatch.setattr(linear_forms, "MAX_BUFFER", 10**9)
    sketch.begin(3)
    torch.testing.assert_close(linear_forms.sketched_sq_norms(g, x, sketch), other, rtol=1e-12, atol=0.0)


CONVS = [
    (nn.Conv1d, 4, 6, (3,), {"stride": 2, "padding": 1}),
    (nn.Conv1d, 4, 6, (4,), {"padding": "same", "padding_mode": "reflect"}),
    (nn.Conv2d, 4, 6, (2, 3), {"stride": (1, 2), "dilation": (2, 1), "padding": (1, 2), "padding_mode": "circular"}),
    (nn.Conv2d, 4, 6, (3, 2), {"dilation": (1, 2), "padding": "same", "padding_mode": "replicate"}),
    (nn.Conv2d, 4, 6, (3, 3), {"groups": 2, "padding": 1}),
    (nn.Conv2d, 6, 6, (3, 3), {"groups": 3, "stride": 2}),
    (nn.Conv2d, 3, 5, (4, 4), {"padding": "same"}),
    (nn.Conv3d, 2, 4, (2, 2, 2), {"stride": (1, 2, 1), "dilation": (1, 1, 2), "padding": "valid"}),
    (nn.Conv2d, 6, 4, (1, 1), {}),  # 1x1: a Linear over the positions
    (nn.Conv2d, 6, 4, (1, 1), {"stride": 2, "groups": 2}),
    (nn.Conv1d, 4, 8, (1,), {"padding": "same"}),
]


def _conv_case(cls, c_in, c_out, ks, kw):
    torch.manual_seed(0)
    conv = cls(c_in, c_out, ks, **kw).double()
    x = torch.randn(3, c_in, *(9 for _ in ks), dtype=torch.float64)
    g = torch.randn_like(conv(x))
    exact = []
    for i in range(3):
        xi = x[i : i + 1].requires_grad_(False)
        (gw,) = torch.autograd.grad(conv(xi), conv.weight, g[i : i + 1])
        exact.append(gw.square().sum())
    return conv, x, g, torch.stack(exact)


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[0].__name__}-{c[4]}")
def test_conv_without_im2col_equals_the_patches_and_autograd(monkeypatch, case):
    conv, x, g, exact = _conv_case(*case)
    patches = conv_patches(
        x,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        dilation=conv.dilation,
        padding=conv.padding,
        padding_mode=conv.padding_mode,
    )
    torch.testing.assert_close(conv_weight_sq_norms(patches, g, groups=conv.groups), exact, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(conv_grouped_weight_sq_norms(conv, x, g), exact, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(conv_layer_weight_sq_norms(conv, x, g), exact, rtol=1e-10, atol=0.0)
    monkeypatch.setattr(linear_forms, "MAX_BUFFER", 1)  # one example at a time, every path
    torch.testing.assert_close(conv_grouped_weight_sq_norms(conv, x, g), exact, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(conv_layer_weight_sq_norms(conv, x, g), exact, rtol=1e-10, atol=0.0)


def test_grouped_conv_keeps_each_chunk_within_the_cpu_working_set(monkeypatch):
    """Chunks of ``CPU_WORKING_SET // per-example`` examples (so glibc keeps the pages), equal to one call."""
    conv, x, g, exact = _conv_case(nn.Conv2d, 4, 6, (3, 3), {"padding": 1})
    x, g = x.repeat(3, 1, 1, 1), g.repeat(3, 1, 1, 1)  # 9 examples
    whole = conv_grouped_weight_sq_norms(conv, x, g)
    torch.testing.assert_close(whole, exact.repeat(3), rtol=1e-10, atol=0.0)
    per_example = 6 * 4 * 9
    monkeypatch.setattr(linear_forms, "CPU_WORKING_SET", 2 * per_example)  # 2 examples a chunk: 5 calls
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        chunked = conv_grouped_weight_sq_norms(conv, x, g)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward")
    assert calls == 5
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[0].__name__}-{c[4]}")
def test_conv_sketch_is_unbiased_for_every_layout(case):
    conv, x, g, exact = _conv_case(*case)
    sketch = Sketch(3)
    draws = []
    for step in range(300):
        sketch.begin(step)
        draws.append(conv_sketched_sq_norms(conv, x, g, sketch))
    samples = torch.stack(draws)
    z = (samples.mean(0) - exact) / (samples.std(0) / samples.shape[0] ** 0.5)
    assert bool((z.abs() <= 3.0).all()), z


def test_conv_layer_form_with_a_sketch_that_pays():
    conv, x, g, exact = _conv_case(nn.Conv2d, 16, 32, (3, 3), {"padding": 1})
    sketch = Sketch(2)
    sketch.begin(1)
    with use_sketch(sketch):
        got = conv_layer_weight_sq_norms(conv, x, g)
    sketch.begin(1)
    torch.testing.assert_close(got, conv_sketched_sq_norms(conv, x, g, sketch), rtol=0.0, atol=0.0)
    assert not torch.allclose(got, exact)


def _ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def _added_ops(layers: int, batch: int, t: int | None) -> int:
    """Operators a measured step of an MLP of ``layers`` Linear layers adds over the same step unmonitored."""
    torch.manual_seed(0)

    def mlp() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(16, 16), nn.Tanh())))

    plain, watched = mlp(), mlp()
    monitor = ns.GNSMonitor(watched, source="example")
    shape = (batch, 16) if t is None else (batch, t, 16)
    x = torch.randn(*shape)

    def step(m: nn.Module, mon: ns.GNSMonitor | None) -> None:
        m(x).square().mean().backward()
        if mon is not None:
            mon.step(batch_size=batch)
        for p in m.parameters():
            p.grad = None

    step(watched, monitor)  # the first step checks what it must, once
    added = _ops(lambda: step(watched, monitor)) - _ops(lambda: step(plain, None))
    monitor.close()
    return added


@pytest.mark.parametrize(("t", "most"), [(None, 28), (8, 42)])
def test_a_measured_step_launches_a_few_operators_per_layer(t, most):
    """The operators a measured step adds over a plain one, counted by the profiler (what ``benchmarks/op_counts.py``
    tracks without a GPU): a fixed number per layer, whatever the batch, none per example or position.

    Every ATen operator counts, views and allocations included.  Measured on torch 2.13, per Linear layer: 25 on
    2-D inputs (two row norms and a product, 2-3 operators each; the big batch's ``|p.grad|^2`` read for the
    weight and the bias, 4 each on the host path), 37 on 3-D inputs (two Gram products, their product and sums, and
    the views they need); a fixed 8 per step for the sums.
    """
    three, six = _added_ops(3, 32, t), _added_ops(6, 32, t)
    assert _added_ops(3, 256, t) == three  # nothing per example
    per_layer = (six - three) / 3
    assert per_layer <= most, per_layer
    assert three - 3 * per_layer <= 12, three
