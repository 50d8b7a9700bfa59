"""What real training loops do to ``p.grad`` between backward and ``monitor.step()`` changes nothing measured.

Two monitors watch the same model: one steps right after backward, the other after the loop has clipped,
unscaled, zeroed or rescaled the gradients.  Both must report the same numbers, and training with them must
follow the same trajectory as training without them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import noisescale as ns

B = 24


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 6, generator=g, dtype=torch.float64)
    return x, (x[:, :4].argmax(1) + (torch.rand(B, generator=g) < 0.2).long()) % 4


def clip_norm(model, scaler, opt):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)


def clip_value(model, scaler, opt):
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)


def zero_in_place(model, scaler, opt):
    model.zero_grad(set_to_none=False)


def zero_to_none(model, scaler, opt):
    model.zero_grad(set_to_none=True)


def scale_in_place(model, scaler, opt):
    for p in model.parameters():
        p.grad.mul_(0.25)


def unscale(model, scaler, opt):
    scaler.unscale_(opt)


FAULTS = [clip_norm, clip_value, zero_in_place, zero_to_none, scale_in_place, unscale]


def _train(source: str, k: int, fault, steps: int = 6, *, monitored: bool = True):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if fault is unscale else None
    before = ns.GNSMonitor(model, source=source, scaler=scaler) if monitored else None
    after = ns.GNSMonitor(model, source=source, scaler=scaler) if monitored else None
    pairs = []
    for step in range(steps):
        x, y = batch(step)
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            loss = nn.functional.cross_entropy(model(xs), ys) / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if monitored:
            m_before = before.step(batch_size=B)
        fault(model, scaler, opt)
        if monitored:
            m_after = after.step(batch_size=B)
            pairs.append((m_before, m_after))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        elif fault not in (zero_to_none,):
            opt.step()
        opt.zero_grad()
    return model, pairs


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("source, k", [("example", 1), ("example", 2), ("microbatch", 3)])
def test_changes_to_p_grad_before_step_change_nothing_measured(source, k, fault):
    _, pairs = _train(source, k, fault)
    for m_before, m_after in pairs:
        assert m_after.status == m_before.status == "ok"
        for col in ("grad_sq_raw", "trace_cov_raw", "b_simple", "b_simple_low", "b_simple_high"):
            a, b = getattr(m_before, col), getattr(m_after, col)
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0), (col, a, b)
        for name, layer in m_before.layers.items():
            assert math.isclose(layer.trace_cov_raw, m_after.layers[name].trace_cov_raw, rel_tol=1e-12), name


@pytest.mark.parametrize("fault", [clip_norm, unscale], ids=lambda f: f.__name__)
def test_monitoring_leaves_the_training_trajectory_unchanged(fault):
    plain, _ = _train("example", 2, fault, monitored=False)
    watched, _ = _train("example", 2, fault, monitored=True)
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_step_with_fewer_passes_after_clipping_is_left_out_with_the_reason():
    """The last pass of a step with fewer passes than the previous one was not read: refused, not wrong."""
    model = make_model()
    monitor = ns.GNSMonitor(model, source="microbatch")
    statuses = []
    for step, k in enumerate([4, 4, 2, 2, 2]):
        x, y = batch(step)
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (nn.functional.cross_entropy(model(xs), ys) / k).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = monitor.step(batch_size=B)
        statuses.append(m.status)
        if step == 2:
            assert m.b_simple_raw is None and "p.grad changed" in (m.undefined_reason or "")
            assert any("monitor.step() right after the last backward" in str(w.message) for w in caught)
        model.zero_grad()
    assert statuses == ["ok", "ok", "undefined", "ok", "ok"]


def test_fewer_passes_without_changes_are_read_at_step():
    model = make_model()
    monitor = ns.GNSMonitor(model, source="microbatch")
    for step, k in enumerate([4, 2, 3]):
        x, y = batch(step)
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (nn.functional.cross_entropy(model(xs), ys) / k).backward()
        expected = sum(float(p.grad.square().sum()) for p in model.parameters())
        m = monitor.step(batch_size=B)
        assert m.status == "ok"
        # |G_B|^2 = |G|^2 + tr(Sigma)/B, whatever k
        assert math.isclose(m.grad_sq_raw + m.trace_cov_raw / B, expected, rel_tol=1e-10)
        model.zero_grad()
