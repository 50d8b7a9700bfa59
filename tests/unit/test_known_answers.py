"""Known answers (REFERENCE.md): the smoothed B_simple lands within 5% of the analytic value at fixed parameters."""

import pytest
import torch
from torch import nn

import noisescale as ns


def linear_regression_b_simple(C: torch.Tensor, D: torch.Tensor, s2: float) -> float:
    """B_simple = 1 + (D^T C D + s^2) tr(C) / (D^T C^2 D) for loss 0.5 (x^T w - y)^2, x ~ N(0, C)."""
    return float(1 + (D @ C @ D + s2) * torch.trace(C) / (D @ C @ C @ D))


def test_reference_examples():
    assert linear_regression_b_simple(torch.eye(100), torch.ones(100) / 10, 1.0) == pytest.approx(201)
    assert linear_regression_b_simple(torch.diag(torch.tensor([4.0, 1.0])), torch.ones(2), 1.0) == pytest.approx(
        2.7647, abs=1e-4
    )


@pytest.mark.parametrize(
    "C, D, s2, B, steps, source, k",
    [
        (torch.diag(torch.tensor([4.0, 1.0])), torch.ones(2), 1.0, 64, 400, "example", 1),
        (torch.diag(torch.tensor([4.0, 1.0])), torch.ones(2), 1.0, 64, 600, "microbatch", 16),
        (torch.eye(100), torch.ones(100) / 10, 1.0, 128, 600, "example", 1),
    ],
    ids=["2d-example", "2d-microbatch", "100d-example"],
)
def test_linear_regression_known_answer(C, D, s2, B, steps, source, k):
    torch.manual_seed(0)
    d = C.shape[0]
    w_star = torch.randn(d, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + D).unsqueeze(0))
    chol = torch.linalg.cholesky(C.double())
    truth = linear_regression_b_simple(C.double(), D.double(), s2)
    with ns.GNSMonitor(model, source=source, halflife=steps * B / 4, per_layer=False) as monitor:
        for _ in range(steps):
            x = torch.randn(B, d, dtype=torch.float64) @ chol.T
            y = x @ w_star + s2**0.5 * torch.randn(B, dtype=torch.float64)
            for xs, ys in zip(x.chunk(k), y.chunk(k)):
                loss = 0.5 * (model(xs).squeeze(1) - ys).square().mean() / k
                loss.backward()
            m = monitor.step(batch_size=B)
            model.zero_grad()
    assert m.b_simple == pytest.approx(truth, rel=0.05)
    assert m.b_simple_low <= truth <= m.b_simple_high
    assert m.status == "ok"


def test_gaussian_gradients_known_answer():
    """g_i = G + Sigma^{1/2} z_i injected as per-example gradients of a linear 'model' sum_i g_i . w."""
    torch.manual_seed(1)
    d, B, steps = 32, 64, 300
    G = torch.full((d,), 0.2, dtype=torch.float64)
    scales = torch.linspace(0.2, 1.0, d, dtype=torch.float64)
    truth = float(scales.square().sum() / G.square().sum())
    w = nn.Linear(d, 1, bias=False).double()
    with ns.GNSMonitor(w, source="example", halflife=steps * B / 4) as monitor:
        for _ in range(steps):
            g = torch.randn(B, d, dtype=torch.float64) * scales + G
            # d/dw of mean_i (g_i . w) is g_i / B per example: per-example gradient g_i exactly.
            w(g).mean().backward()
            m = monitor.step(batch_size=B)
            w.zero_grad()
    assert m.b_simple == pytest.approx(truth, rel=0.05)
    assert m.layers["weight"].b_simple == pytest.approx(m.b_simple)
