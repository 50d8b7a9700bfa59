"""The two-batch estimator against hand computations and its unbiasedness on Gaussian gradients."""

import pytest
import torch

import noisescale as ns
from noisescale.estimators.two_batch import two_batch_from_sums


def test_equal_sizes_match_mccandlish_formulas():
    # |G|^2 = (B_b |G_b|^2 - B_s |G_s|^2) / (B_b - B_s), tr = (|G_s|^2 - |G_b|^2) / (1/B_s - 1/B_b)
    gs, gb, bs, bb = 7.0, 3.0, 8, 32
    est = ns.two_batch_estimate(torch.tensor([gs, gs]), [bs, bs], gb, bb)
    assert float(est.grad_sq) == pytest.approx((bb * gb - bs * gs) / (bb - bs))
    assert float(est.trace_cov) == pytest.approx((gs - gb) / (1 / bs - 1 / bb))
    assert float(est.b_simple) == pytest.approx(float(est.trace_cov) / float(est.grad_sq))


def test_per_example_form_is_the_sample_variance():
    torch.manual_seed(0)
    g = torch.randn(50, 6, dtype=torch.float64) + 0.3
    mean = g.mean(0)
    est = ns.two_batch_estimate(g.square().sum(1), 1, mean.square().sum(), 50)
    # tr(Sigma) = sum of per-coordinate unbiased sample variances; |G|^2 = |mean|^2 - tr/B
    tr = g.var(0, unbiased=True).sum()
    assert float(est.trace_cov) == pytest.approx(float(tr), rel=1e-12)
    assert float(est.grad_sq) == pytest.approx(float(mean.square().sum() - tr / 50), rel=1e-12)


def test_unequal_sizes_are_unbiased_on_gaussian_gradients():
    torch.manual_seed(1)
    d, sizes = 20, [3, 5, 12]
    big = sum(sizes)
    G = torch.randn(d, dtype=torch.float64) * 0.5
    scales = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    true_tr, true_g2 = float(scales.square().sum()), float(G.square().sum())
    trials = 4000
    z = torch.randn(trials, big, d, dtype=torch.float64) * scales + G
    parts = torch.split(z, sizes, dim=1)
    small = torch.stack([p.mean(1).square().sum(-1) for p in parts], dim=1)  # (trials, k)
    bigsq = z.mean(1).square().sum(-1)
    est = two_batch_from_sums(small.sum(1), len(sizes), sum(1 / s for s in sizes), bigsq, big)
    se_tr = float(est.trace_cov.std()) / trials**0.5
    se_g2 = float(est.grad_sq.std()) / trials**0.5
    assert abs(float(est.trace_cov.mean()) - true_tr) < 4 * se_tr
    assert abs(float(est.grad_sq.mean()) - true_g2) < 4 * se_g2


def test_vectorised_rows_are_independent():
    small = torch.tensor([[4.0, 1.0], [6.0, 3.0]])  # k=2 small batches, 2 rows
    est = ns.two_batch_estimate(small, [1, 1], torch.tensor([2.0, 1.0]), 2)
    for r in range(2):
        one = ns.two_batch_estimate(small[:, r], [1, 1], float([2.0, 1.0][r]), 2)
        assert float(est.trace_cov[r]) == pytest.approx(float(one.trace_cov))


@pytest.mark.parametrize(
    "args, match",
    [
        (([], [], 1.0, 4), "at least one"),
        (([1.0, 2.0], [1], 1.0, 4), "entries"),
        (([1.0, 2.0], [1, 0], 1.0, 4), "positive"),
        (([1.0], [4], 1.0, 4), "smaller on average"),
    ],
)
def test_bad_input_says_what_is_wrong(args, match):
    with pytest.raises(ValueError, match=match):
        ns.two_batch_estimate(*args)


def test_b_simple_is_nan_when_grad_sq_not_positive():
    est = ns.two_batch_estimate(torch.tensor([3.0, 5.0]), [1, 1], 2.0, 2)  # grad_sq == 0
    assert torch.isnan(est.b_simple)
