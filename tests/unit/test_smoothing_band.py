"""Separate smoothing (half-life in examples) and the coverage of the Fieller band on an oracle."""

import math

import pytest
import torch

from noisescale.estimators import decay_for, ema_init, ema_moments, ema_update, fieller_band, z_for


def _feed(values_g, values_t, beta):
    s = ema_init(1)
    for g, t in zip(values_g, values_t):
        s = ema_update(s, torch.tensor([g]), torch.tensor([t]), beta, torch.tensor([True]))
    return s


def test_bias_corrected_mean_of_a_constant_is_exact_from_the_first_step():
    s = _feed([2.0], [10.0], 0.9)
    m = ema_moments(s)
    assert float(m.grad_sq) == pytest.approx(2.0)
    assert float(m.trace_cov) == pytest.approx(10.0)
    assert math.isinf(float(m.var_grad_sq))  # one step: no variance yet


def test_weights_match_an_explicit_weighted_average():
    g = [1.0, 4.0, 2.0, 8.0, 5.0]
    beta = 0.7
    s = _feed(g, g, beta)
    w = [(1 - beta) * beta ** (len(g) - 1 - i) for i in range(len(g))]
    mean = sum(wi * gi for wi, gi in zip(w, g)) / sum(w)
    m = ema_moments(s)
    assert float(m.grad_sq) == pytest.approx(mean)
    n_eff = sum(w) ** 2 / sum(wi * wi for wi in w)
    assert float(m.n_eff) == pytest.approx(n_eff)


def test_halflife_is_counted_in_examples():
    # Two steps of 64 examples decay like one step of 128.
    assert decay_for(64, 1000) ** 2 == pytest.approx(decay_for(128, 1000))
    assert decay_for(500, 500) == pytest.approx(0.5)


def test_masked_rows_do_not_move():
    s = _feed([1.0, 2.0], [1.0, 2.0], 0.5)
    s2 = ema_update(s, torch.tensor([100.0]), torch.tensor([100.0]), 0.5, torch.tensor([False]))
    assert torch.equal(s2.g, s.g) and torch.equal(s2.w, s.w)


def test_band_is_unbounded_when_denominator_is_noise():
    low, high = fieller_band(
        torch.tensor([10.0]), torch.tensor([0.1]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), 1.645
    )
    assert float(low) >= 0 and math.isinf(float(high))


def test_band_brackets_the_ratio_when_precise():
    low, high = fieller_band(
        torch.tensor([10.0]),
        torch.tensor([2.0]),
        torch.tensor([0.01]),
        torch.tensor([0.001]),
        torch.tensor([0.0]),
        1.645,
    )
    assert float(low) < 5.0 < float(high)
    assert float(high) - float(low) < 0.5


def test_nominal_90_percent_band_covers_the_truth_80_to_97_percent_of_seeds():
    """Oracle: Gaussian per-example gradients with chosen G and Sigma at fixed parameters.

    Each seed runs 120 steps of B=32 per-example gradients through the two-batch estimator and the smoother;
    the band at the last step must contain tr(Sigma)/|G|^2.  Seeds are vectorised as rows.
    """
    from noisescale.estimators.two_batch import two_batch_from_sums

    seeds, d, B, steps = 400, 16, 32, 120
    gen = torch.Generator().manual_seed(0)
    G = torch.full((d,), 0.25, dtype=torch.float64)
    scales = torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    truth = float(scales.square().sum() / G.square().sum())  # = 17.5
    beta = decay_for(B, 20 * B)
    state = ema_init(seeds)
    mask = torch.ones(seeds, dtype=torch.bool)
    for _ in range(steps):
        g = torch.randn(seeds, B, d, generator=gen, dtype=torch.float64) * scales + G
        est = two_batch_from_sums(g.square().sum(-1).sum(1), B, float(B), g.mean(1).square().sum(-1), B)
        state = ema_update(state, est.grad_sq, est.trace_cov, beta, mask)
    m = ema_moments(state)
    low, high = fieller_band(m.trace_cov, m.grad_sq, m.var_trace_cov, m.var_grad_sq, m.cov, z_for(0.9))
    coverage = float(((low <= truth) & (truth <= high)).double().mean())
    assert 0.80 <= coverage <= 0.97, coverage
    # and the band is informative, not (0, inf)
    assert float(torch.isfinite(high).double().mean()) > 0.95
