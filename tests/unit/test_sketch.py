"""Sketched per-example norms (``GNSMonitor(sketch=k)``): unbiased for every rule that sketches, fresh each step,
and the Fieller band still covers the truth on the Gaussian oracle with the sketch's variance in the raw estimates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.collectors.example import ExampleCollector
from noisescale.collectors.rules.embedding import embedding_form
from noisescale.collectors.rules.linear_forms import sketched_sq_norms
from noisescale.collectors.rules.sketch import Sketch
from noisescale.estimators.band import fieller_band, z_for
from noisescale.estimators.smoothing import decay_for, ema_init, ema_moments, ema_update
from noisescale.estimators.two_batch import two_batch_from_sums

pytestmark = pytest.mark.usefixtures("one_thread")


class _Sketchable(nn.Module):
    """One layer of each family that sketches, at shapes where the sketch pays with k = 4, and two that never do
    (a Linear on 2-D inputs, biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 32)
        self.seq = nn.Linear(32, 64)  # on (B, T=64, 32): materialised 64 * 32 * 64 per example, sketch 64 * 4 * 96
        self.seq2 = nn.Linear(64, 32)
        self.conv = nn.Conv2d(2, 16, 3, padding=1)  # 36 positions x 18 x 16 per example; sketch 36 * 4 * 34
        self.head = nn.Linear(32 + 16, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.seq2(torch.tanh(self.seq(self.emb(ids)))).mean(1)  # (B, 32)
        c = torch.tanh(self.conv(img)).mean((2, 3))  # (B, 16)
        return self.head(torch.cat([h, c], 1))


def _per_example(model: nn.Module, batch: tuple[torch.Tensor, ...], sketch: int | None, step: int) -> dict:
    ids, img, y = batch
    loss = lambda: nn.functional.cross_entropy(model(ids, img), y, reduction="sum")  # noqa: E731
    return _collected_norms(model, loss, sketch, step)


def _collected_norms(model: nn.Module, loss: Callable[[], torch.Tensor], sketch: int | None, step: int) -> dict:
    """Each measured parameter's per-example squared norms of one backward pass of ``loss()``, in float64."""
    col = ExampleCollector(model, keep_per_example=True, sketch=sketch)
    col.arm(True, step=step)
    loss().backward()
    out = {n: v.double() for n, v in col.per_example_sq_norms().items()}
    col.close()
    model.zero_grad()
    return out


def _assert_unbiased(exact: dict, draws: list[dict], sketched: set[str]) -> None:
    """The sketched parameters' mean over ``draws`` equals the exact norms within 3 standard errors (and varies:
    the sketch was used); the others are exact on every draw."""
    assert sketched <= set(exact)
    for name, ref in exact.items():
        samples = torch.stack([d[name] for d in draws])  # (steps, B)
        if name not in sketched:
            torch.testing.assert_close(samples.amax(0), samples.amin(0), rtol=0.0, atol=0.0)  # exact every time
            continue
        assert bool((samples.std(0) > 1e-3 * ref).all()), name  # the sketch was used
        z = (samples.mean(0) - ref) / (samples.std(0) / samples.shape[0] ** 0.5)
        assert bool((z.abs() <= 3.0).all()), (name, z)


def test_every_rule_that_sketches_is_unbiased():
    """Over many steps (fresh projections each), the mean of each example's sketched squared norm equals the exact
    one within 3 standard errors, for the Linear on sequences, the Conv2d and the Embedding; the others are exact."""
    torch.manual_seed(0)
    model = _Sketchable().double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randint(0, 1000, (4, 64), generator=g),
        torch.randn(4, 2, 6, 6, generator=g).double(),
        torch.arange(4) % 3,
    )
    assert embedding_form(64, 1000, 4) == "sketch"
    exact = _per_example(model, batch, None, 1)
    draws = [_per_example(model, batch, 4, step) for step in range(1, 401)]
    sketched = {"emb.weight", "seq.weight", "seq2.weight", "conv.weight"}
    for name, ref in exact.items():
        samples = torch.stack([d[name] for d in draws])  # (steps, B)
        if name not in sketched:
            assert torch.equal(samples.amax(0), samples.amin(0)), name  # exact every time
            torch.testing.assert_close(samples[0], ref, rtol=1e-12, atol=0.0)
            continue
        assert bool((samples.std(0) > 1e-3 * ref).all()), name  # the sketch was used
        se = samples.std(0) / samples.shape[0] ** 0.5
        z = (samples.mean(0) - ref) / se
        assert bool((z.abs() <= 3.0).all()), (name, z)


class _SharedAndPacked(nn.Module):
    """The other paths that reach a sketch, at shapes where it pays with k = 4: two Linears reading one tensor
    (which share its projection) and a 1x1 convolution (taken through the Linear forms)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 16)
        self.k = nn.Linear(32, 16)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(16 + 32, 3)

    def forward(self, h: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        s = (torch.tanh(self.q(h)) * self.k(h)).mean(1)  # (B, T=64, 16) -> (B, 16)
        c = torch.tanh(self.pointwise(img)).mean((2, 3))  # (B, 32)
        return self.head(torch.cat([s, c], 1))


def test_shared_projections_and_pointwise_convolutions_are_unbiased():
    """The unbiasedness of the test above through a projection shared by two layers (their two estimates are
    correlated, each is unbiased) and a 1x1 convolution."""
    torch.manual_seed(0)
    model = _SharedAndPacked().double()
    g = torch.Generator().manual_seed(3)
    h, img = torch.randn(4, 64, 32, generator=g).double(), torch.randn(4, 32, 8, 8, generator=g).double()
    y = torch.arange(4) % 3

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(h, img), y, reduction="sum")

    exact = _collected_norms(model, loss, None, 1)
    draws = [_collected_norms(model, loss, 4, step) for step in range(1, 251)]
    _assert_unbiased(exact, draws, {"q.weight", "k.weight", "pointwise.weight"})


def test_projections_are_fresh_each_step_and_reproducible():
    torch.manual_seed(0)
    model = _Sketchable().double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randint(0, 1000, (4, 64), generator=g),
        torch.randn(4, 2, 6, 6, generator=g).double(),
        torch.arange(4) % 3,
    )
    state = torch.get_rng_state()
    a, b, again = (_per_example(model, batch, 4, step) for step in (7, 8, 7))
    assert torch.equal(torch.get_rng_state(), state)  # the user's generator is never touched
    for name in ("seq.weight", "conv.weight", "emb.weight"):
        assert not torch.equal(a[name], b[name])
        assert torch.equal(a[name], again[name])


def _sketched(sketch: Sketch, step: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    sketch.begin(step)
    return sketched_sq_norms(x, g, sketch)


@pytest.mark.slow
def test_fieller_band_covers_the_truth_with_sketched_norms():
    """The Gaussian oracle of ``test_smoothing_band`` with each per-example squared norm replaced by a sketch of
    k = 2 projections (drawn afresh each step): the raw estimates' spread carries the sketch's variance, and a
    nominal 90% band still covers tr(Sigma) / |G|^2 for 80-97% of the seeds."""
    seeds, m, n, b, steps = 200, 4, 4, 32, 100
    gen = torch.Generator().manual_seed(0)
    mean = torch.full((n, m), 0.25, dtype=torch.float64)
    scales = torch.linspace(0.5, 1.5, m * n, dtype=torch.float64).reshape(n, m)
    truth = float(scales.square().sum() / mean.square().sum())  # 17.5
    beta = decay_for(b, 20 * b)
    state = ema_init(seeds)
    mask = torch.ones(seeds, dtype=torch.bool)
    sketches = [Sketch(2, seed=1000 + s) for s in range(seeds)]  # independent projections for every seed
    x = torch.eye(m, dtype=torch.float64).expand(b, m, m)  # T = m positions, x_t = e_t: W_i = g_i^T
    spread = []
    for step in range(steps):
        w = torch.randn(seeds, b, n, m, generator=gen, dtype=torch.float64) * scales + mean  # per-example gradients
        g = w.transpose(2, 3)  # (seeds, B, T = m, n): sum_t g_t x_t^T = w
        sq = torch.stack([_sketched(sketches[s], step, x, g[s]) for s in range(seeds)])  # (seeds, B)
        spread.append(float((sq / w.square().sum((2, 3)) - 1).std()))
        est = two_batch_from_sums(sq.sum(1), b, float(b), w.mean(1).square().sum((1, 2)), b)
        state = ema_update(state, est.grad_sq, est.trace_cov, beta, mask)
    assert sum(spread) / steps > 0.3  # the sketch is far from exact: its variance must be in the band
    mom = ema_moments(state)
    low, high = fieller_band(mom.trace_cov, mom.grad_sq, mom.var_trace_cov, mom.var_grad_sq, mom.cov, z_for(0.9))
    coverage = float(((low <= truth) & (truth <= high)).double().mean())
    assert 0.80 <= coverage <= 0.97, coverage
    assert float(torch.isfinite(high).double().mean()) > 0.95


def test_sketch_option_is_checked_and_needs_per_example_norms():
    with pytest.raises(ns.ConfigError, match="sketch must be a positive int"):
        ns.GNSMonitor(nn.Linear(2, 2), sketch=0)
    with pytest.raises(ns.ConfigError, match="source='microbatch' does not use"):
        ns.GNSMonitor(nn.Linear(2, 2), source="microbatch", sketch=8)


def test_monitor_with_a_sketch_keeps_the_every_step_cadence_semantics():
    """every=N with a sketch: the measured steps draw the projections of their own step number, so they are the
    every-step run's, bit for bit."""

    def run(every: int) -> list[ns.Measurement]:
        torch.manual_seed(0)
        model = _Sketchable()
        monitor = ns.GNSMonitor(model, source="example", sketch=4, every=every)
        g = torch.Generator().manual_seed(2)
        out = []
        for _ in range(7):
            ids, img = torch.randint(0, 1000, (4, 64), generator=g), torch.randn(4, 2, 6, 6, generator=g)
            nn.functional.cross_entropy(model(ids, img), torch.arange(4) % 3).backward()
            out.append(monitor.step(batch_size=4))
            model.zero_grad()
        monitor.close()
        return out

    every1, every3 = run(1), run(3)
    for step in (1, 4, 7):
        assert every3[step - 1].trace_cov_raw == every1[step - 1].trace_cov_raw
        assert every3[step - 1].grad_sq_raw == every1[step - 1].grad_sq_raw


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` measured from the inside, at a shape where the sketch pays with k = 4 (T=64, E=32)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_attention_projections_are_sketched_and_unbiased():
    """The projections of ``nn.MultiheadAttention``, whose norms its own hooks compute, use the collector's sketch
    and stay unbiased; the biases are exact."""
    torch.manual_seed(0)
    model = _Attention().double()
    g = torch.Generator().manual_seed(5)
    h, y = torch.randn(4, 64, 32, generator=g).double(), torch.arange(4) % 3

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(h), y, reduction="sum")

    exact = _collected_norms(model, loss, None, 1)
    draws = [_collected_norms(model, loss, 4, step) for step in range(1, 251)]
    _assert_unbiased(exact, draws, {"attn.in_proj_weight", "attn.out_proj.weight"})
