"""Every built-in per-example norm rule against a per-example autograd loop in float64.

``ExampleCollector(keep_per_example=True)`` records each example's share of ``p.grad``; with a per-example loss
``l_i`` reduced as a sum (share ``c = 1``), a mean over each of ``k`` micro-batches divided by ``k``
(``c = 1 / (b_j k)``), or a mean over the whole step (``c = 1 / B``), and a loss scale ``s`` (GradScaler), the
expected value is ``|c s grad l_i|^2`` for every parameter and example.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tests.helpers.reference import per_example_sq_norms
from torch import nn

import noisescale as ns
from noisescale.collectors.base import equal_split
from noisescale.collectors.example import ExampleCollector
from noisescale.collectors.rules import find_norm_rule, is_norm_layer, rms_norm_rule
from noisescale.collectors.rules.embedding import embedding_form
from noisescale.collectors.rules.registry import forward_check
from noisescale.errors import UnsupportedLayerError

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
    pytest.mark.usefixtures("one_thread"),
]

B = 7  # odd, so 2..4 micro-batches are unequal (4+3, 3+2+2, 2+2+2+1)
SCALE = 2.0**10


class HandRMSNorm(nn.Module):
    """A user's RMSNorm, Llama style: ``weight * x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


# The one line a user writes to have their RMSNorm measured (and counted by scope="norm").
ns.register_norm_rule(HandRMSNorm, normalization=True)(rms_norm_rule)


class RecognisedRMSNorm(nn.Module):
    """Hugging Face's shape (``weight``, ``variance_epsilon``), never registered: recognised by structure."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class OnePlusRMSNorm(nn.Module):
    """Gemma's variant, ``x_hat * (1 + weight)``: the same weight gradient."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)


class Float32RMSNorm(RecognisedRMSNorm):
    """As Llama's: normalises in float32 whatever the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection: ``x @ weight + bias`` with ``weight`` of shape ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.3 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class SharedInputProjections(nn.Module):
    """Query-, key- and value-like projections of one input: one Gram matrix of the input for all three."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


class CenteredRMSNorm(RecognisedRMSNorm):
    """Named like an RMSNorm, but subtracts the mean: a LayerNorm without bias, which the RMS rule would get wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - x.mean(-1, keepdim=True))


def sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``(B,)``: a squared error summed over every output of the example."""
    return (out - y).square().flatten(1).sum(1)


def linear_ghost(t: int, m: int, n: int) -> bool:
    """The branch ``linear.sq_norm_of_sum_over_positions`` takes: ghost iff ``T^2 (m + n) <= T m n``."""
    return t * (m + n) <= m * n


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    x: Callable[[torch.Generator], torch.Tensor]
    branches: tuple[bool, ...] = ()  # claims about which branch the shapes force, checked below
    expected_branches: tuple[object, ...] = ()


def _floats(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda gen: torch.randn(B, *shape, generator=gen)


def _ids(vocab: int, *shape: int, all_padding_row: int | None = None) -> Callable[[torch.Generator], torch.Tensor]:
    def make(gen: torch.Generator) -> torch.Tensor:
        x = torch.randint(0, vocab, (B, *shape), generator=gen)
        if all_padding_row is not None:
            x[1] = all_padding_row  # an example that reads only padding: zero weight gradient
        return x

    return make


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


CASES: dict[str, Case] = {
    "linear_2d": Case(lambda: _seq(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), _floats(5)),
    "linear_3d_ghost": Case(
        lambda: _seq(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10)),
        _floats(3, 16),
        branches=(linear_ghost(3, 16, 12), linear_ghost(3, 12, 10)),
        expected_branches=(True, True),
    ),
    "linear_3d_materialised": Case(
        lambda: _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        _floats(9, 3),
        branches=(linear_ghost(9, 3, 4), linear_ghost(9, 4, 2)),
        expected_branches=(False, False),
    ),
    "linear_4d_materialised": Case(
        lambda: _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        _floats(2, 5, 3),
        branches=(linear_ghost(10, 3, 4), linear_ghost(10, 4, 2)),
        expected_branches=(False, False),
    ),
    "embedding_1d": Case(lambda: _seq(nn.Embedding(9, 4), nn.Linear(4, 3)), _ids(9)),
    "embedding_ghost_padding": Case(
        lambda: _seq(nn.Embedding(11, 6, padding_idx=2), nn.Tanh(), nn.Linear(6, 3)),
        _ids(5, 4, all_padding_row=2),  # ids < 5 of 11: many repeats within an example
        branches=(embedding_form(4, 11),),
        expected_branches=("ghost",),
    ),
    "embedding_dense_padding": Case(
        lambda: _seq(nn.Embedding(7, 5, padding_idx=0), nn.Tanh(), nn.Linear(5, 2)),
        _ids(7, 20, 16, all_padding_row=0),  # (B, 20, 16): T = 320 positions, a vocabulary of 7
        branches=(embedding_form(320, 7),),
        expected_branches=("dense",),
    ),
    "embedding_segment_padding": Case(
        lambda: _seq(nn.Embedding(700, 5, padding_idx=0), nn.Tanh(), nn.Linear(5, 2)),
        _ids(7, 20, 16, all_padding_row=0),  # T = 320 positions reading ids < 7 of a vocabulary of 700
        branches=(embedding_form(320, 700),),
        expected_branches=("segments",),
    ),
    "embedding_max_norm": Case(lambda: _seq(nn.Embedding(6, 4, max_norm=1.0), nn.Linear(4, 2)), _ids(6, 5)),
    "layernorm": Case(lambda: _seq(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)), _floats(4, 6)),
    "layernorm_2d_shape_no_bias": Case(
        lambda: _seq(
            nn.LayerNorm((3, 5), bias=False),
            nn.LayerNorm(5, elementwise_affine=False),  # no parameters: nothing to hook
            nn.Flatten(2),
            nn.Linear(15, 2),
        ),
        _floats(2, 3, 5),
    ),
    "rmsnorm_torch_default_eps": Case(lambda: _seq(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 2)), _floats(4, 6)),
    "rmsnorm_torch_2d_shape": Case(
        lambda: _seq(nn.RMSNorm((3, 4), eps=1e-3), nn.Flatten(1), nn.Linear(12, 2)), _floats(3, 4)
    ),
    "rmsnorm_handwritten": Case(lambda: _seq(nn.Linear(6, 8), HandRMSNorm(8), nn.Linear(8, 2)), _floats(4, 6)),
    "hf_conv1d_2d": Case(lambda: _seq(Conv1D(5, 3), nn.Tanh(), Conv1D(2, 5)), _floats(3)),
    "hf_conv1d_3d": Case(lambda: _seq(Conv1D(5, 3), nn.Tanh(), Conv1D(2, 5)), _floats(4, 3)),
    "linear_shared_input": Case(
        lambda: SharedInputProjections(8),
        _floats(3, 8),
        branches=(linear_ghost(3, 8, 8),),
        expected_branches=(True,),
    ),
    "rmsnorm_recognised": Case(lambda: _seq(nn.Linear(6, 8), RecognisedRMSNorm(8), nn.Linear(8, 2)), _floats(4, 6)),
    "rmsnorm_recognised_one_plus": Case(
        lambda: _seq(nn.Linear(6, 8), OnePlusRMSNorm(8), nn.Linear(8, 2)), _floats(3, 6)
    ),
    "conv1d": Case(
        lambda: _seq(
            nn.Conv1d(3, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv1d(4, 6, 4, padding="same", groups=2, padding_mode="reflect"),  # odd total padding
            nn.Tanh(),
            nn.Conv1d(6, 4, 3, dilation=2, padding=2, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv1d(4, 2, 2, padding="valid", bias=False),
        ),
        _floats(3, 11),
        branches=(linear_ghost(6, 9, 4),),  # first conv: L = 6 outputs, C_in k = 9, C_out = 4
        expected_branches=(False,),
    ),
    "conv2d": Case(
        lambda: _seq(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 6, (2, 3), padding="same", dilation=(1, 2), groups=2, padding_mode="replicate"),
            nn.Tanh(),
            nn.Conv2d(6, 4, (3, 1), stride=(1, 2), padding=(1, 0), padding_mode="circular"),
            nn.Tanh(),
            nn.Conv2d(4, 3, 2, padding="same"),  # zeros mode, asymmetric
        ),
        _floats(2, 5, 6),
    ),
    "conv2d_ghost": Case(
        lambda: _seq(nn.Conv2d(8, 8, 3), nn.Flatten(1), nn.Linear(32, 2)),
        _floats(8, 4, 4),
        branches=(linear_ghost(4, 72, 8),),  # L = 2 x 2 outputs, C_in k = 72, C_out = 8
        expected_branches=(True,),
    ),
    "conv3d": Case(lambda: _seq(nn.Conv3d(2, 3, 2, padding=1, groups=1), nn.Flatten(1)), _floats(2, 3, 2, 3)),
    "groupnorm_conv": Case(
        lambda: _seq(nn.Conv2d(2, 6, 2), nn.GroupNorm(3, 6), nn.Flatten(1), nn.Linear(24, 2)), _floats(2, 3, 3)
    ),
    "groupnorm_1d_no_affine_then_linear": Case(
        lambda: _seq(nn.GroupNorm(2, 4, affine=False), nn.Flatten(1), nn.Linear(12, 2)), _floats(4, 3)
    ),
}


def _data(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The case's float32 model, inputs and targets, identical on every call."""
    case = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    model = case.build()
    gen = torch.Generator().manual_seed(1)
    x = case.x(gen)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=gen)
    return model, x, y


@functools.cache
def _reference(name: str) -> dict[str, torch.Tensor]:
    model, x, y = _data(name)
    return per_example_sq_norms(model, x, y, sq_loss)


def _share_and_sizes(reduction: str, k: int) -> tuple[torch.Tensor, list[int]]:
    """Each example's share ``c_i`` of ``p.grad`` (without the loss scale), and the micro-batch sizes."""
    sizes = equal_split(B, k)
    if reduction == "sum":
        c = [1.0] * B
    elif reduction == "micro_mean":
        c = [1.0 / (b * k) for b in sizes for _ in range(b)]
    else:
        c = [1.0 / B] * B
    return torch.tensor(c, dtype=torch.float64), sizes


def _reduce(losses: torch.Tensor, reduction: str, k: int) -> torch.Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction == "micro_mean":
        return losses.mean() / k
    return losses.sum() / B


@pytest.mark.parametrize("name", list(CASES))
def test_cases_force_the_branches_they_claim(name: str) -> None:
    case = CASES[name]
    assert case.branches == case.expected_branches


# Every pair of (reduction, micro-batches k, GradScaler) values occurs for every case and dtype: the 12 settings
# (reduction, k) with the scaler on for half of them, alternating so that each k and each reduction meets both.
SETTINGS = [
    pytest.param(r, k, (i + k) % 2 == 1, id=f"{r}-k{k}-{'scaler' if (i + k) % 2 else 'noscale'}")
    for i, r in enumerate(("sum", "micro_mean", "step_mean"))
    for k in (1, 2, 3, 4)
]


@pytest.mark.parametrize(("reduction", "k", "use_scaler"), SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_per_example_autograd(
    name: str, dtype: torch.dtype, reduction: str, k: int, use_scaler: bool
) -> None:
    model, x, y = _data(name)
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    y = y.to(dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if use_scaler else None
    collector = ExampleCollector(model, keep_per_example=True)
    assert collector.coverage == 1.0
    c, sizes = _share_and_sizes(reduction, k)
    for xj, yj in zip(torch.split(x, sizes), torch.split(y, sizes), strict=True):
        loss = _reduce(sq_loss(model(xj), yj), reduction, k)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    got = collector.per_example_sq_norms()
    ref = _reference(name)
    assert set(got) == set(ref) == {n for n, p in model.named_parameters() if p.requires_grad}
    factor = (c * (SCALE if use_scaler else 1.0)).square()
    rtol = 1e-9 if dtype == torch.float64 else 1e-4  # float64 is exact to ~1e-12; float32 to ~1e-6
    for pname, expected in ref.items():
        expected = expected * factor
        assert got[pname].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(
            got[pname].double(), expected, rtol=rtol, atol=rtol * 1e-3 * float(expected.max()), msg=pname
        )

    stats = collector.collect(B)
    assert stats.n_small == B and stats.examples == B and stats.inv_size_sum == B
    sums = torch.stack([got[n].double().sum() for n, _ in collector.params]) * B**2
    torch.testing.assert_close(stats.small_sq_sum.tensor().double(), sums, rtol=rtol, atol=0.0)
    collector.close()


# -- recognition, registration and refusals -------------------------------------------------------------------


def test_builtin_and_handwritten_rules_are_registered() -> None:
    for layer in (nn.Linear(2, 2), nn.Embedding(3, 2), nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1)):
        assert find_norm_rule(layer) is not None and not is_norm_layer(layer)
    for layer in (nn.LayerNorm(2), nn.RMSNorm(2), nn.GroupNorm(1, 2), HandRMSNorm(2)):
        assert find_norm_rule(layer) is not None and is_norm_layer(layer)
    assert find_norm_rule(HandRMSNorm(2)) is rms_norm_rule
    assert find_norm_rule(nn.GRU(2, 2)) is None


def test_rmsnorms_of_other_libraries_are_recognised_and_checked_once() -> None:
    for layer in (RecognisedRMSNorm(3), OnePlusRMSNorm(3), Float32RMSNorm(3)):
        assert find_norm_rule(layer) is rms_norm_rule and is_norm_layer(layer) and forward_check(layer) is not None
    assert forward_check(HandRMSNorm(3)) is None  # registered: its class's rule, no check

    class BiasedRMSNorm(RecognisedRMSNorm):  # a second parameter: not the family
        def __init__(self, dim: int) -> None:
            super().__init__(dim)
            self.bias = nn.Parameter(torch.zeros(dim))

    class RMSNormWrapper(nn.Module):  # no "Norm" family: children
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(3)), 1e-6
            self.inner = nn.Identity()

    assert find_norm_rule(RMSNormWrapper()) is None
    with pytest.raises(UnsupportedLayerError, match="RMSNormWrapper"):
        ExampleCollector(_seq(nn.Linear(2, 3), RMSNormWrapper()))
    # A bias it never uses: recognised as a hand-written norm by its structure, refused by its first call.
    layer = BiasedRMSNorm(3)
    assert find_norm_rule(layer) is not None and forward_check(layer) is not None
    model = _seq(nn.Linear(2, 3), layer)
    collector = ExampleCollector(model)
    with pytest.raises(UnsupportedLayerError, match=r"BiasedRMSNorm looks like a normalisation layer.*every parameter"):
        model(torch.randn(4, 2))
    collector.close()


def test_layers_reading_one_input_share_its_gram_matrix() -> None:
    model, x, y = _data("linear_shared_input")
    model = model.double()
    collector = ExampleCollector(model, keep_per_example=True)
    grams = collector.gram_cache
    hits = grams.hits
    sq_loss(model(x.double()), y.double()).sum().backward()
    assert grams.hits == hits + 2  # q, k and v read the same tensor: one Gram matrix, two reuses
    ref = _reference("linear_shared_input")
    for name, got in collector.per_example_sq_norms().items():
        torch.testing.assert_close(got, ref[name], rtol=1e-10, atol=0.0, msg=name)
    collector.close()
    del x
    gc.collect()
    assert not grams.holds_a_matrix  # let go with the input


def test_equal_but_distinct_inputs_do_not_share_a_gram_matrix() -> None:
    class TwoCopies(SharedInputProjections):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.q(x.clone())) * self.k(x.clone()) + self.v(x.clone()))

    torch.manual_seed(0)
    model = TwoCopies(8).double()
    collector = ExampleCollector(model)
    hits = collector.gram_cache.hits
    model(torch.randn(B, 3, 8, dtype=torch.float64)).square().sum().backward()
    assert collector.gram_cache.hits == hits
    collector.close()


def test_a_conv1d_that_is_not_x_at_w_plus_b_is_refused() -> None:
    class Conv1D(nn.Module):  # the same structure, but multiplies by the transpose
        def __init__(self) -> None:
            super().__init__()
            self.nf = 3
            self.weight, self.bias = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T + self.bias

    model = _seq(Conv1D(), nn.Linear(3, 1)).double()
    assert find_norm_rule(model[0]) is not None and not is_norm_layer(model[0])
    collector = ExampleCollector(model)
    with pytest.raises(UnsupportedLayerError, match=r"Conv1D looks like a linear layer with a transposed weight"):
        model(torch.randn(4, 3, dtype=torch.float64))
    collector.close()


def test_a_look_alike_rmsnorm_is_refused_on_its_first_forward() -> None:
    model = _seq(nn.Linear(4, 6), CenteredRMSNorm(6), nn.Linear(6, 2)).double()
    collector = ExampleCollector(model)  # recognised by structure: only its output can tell
    for _ in range(2):  # refused again if the error was caught: never measured with the wrong maths
        with pytest.raises(UnsupportedLayerError, match=r"CenteredRMSNorm .*register_norm_rule\(CenteredRMSNorm\)"):
            model(torch.randn(5, 4, dtype=torch.float64))
    collector.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_an_rmsnorm_normalising_in_float32_passes_the_check(dtype: torch.dtype) -> None:
    """Llama's RMSNorm computes in float32 even for float64 inputs: rounding, not other maths."""
    model = _seq(nn.Linear(4, 6), Float32RMSNorm(6), nn.Linear(6, 2)).to(dtype)
    collector = ExampleCollector(model, keep_per_example=True)
    x = torch.randn(5, 3, 4, dtype=dtype)
    model(x).float().square().sum().backward()
    assert collector.per_example_sq_norms()["1.weight"].shape == (5,)
    collector.close()


def test_handwritten_rmsnorm_is_measured_by_scope_norm() -> None:
    model, x, y = _data("rmsnorm_handwritten")
    model = model.double()
    collector = ExampleCollector(model, keep_per_example=True, scope="norm")
    assert [n for n, _ in collector.params] == ["1.weight"]
    sq_loss(model(x.double()), y.double()).sum().backward()
    torch.testing.assert_close(
        collector.per_example_sq_norms()["1.weight"], _reference("rmsnorm_handwritten")["1.weight"]
    )


def test_half_precision_inputs_are_measured_in_float32() -> None:
    torch.manual_seed(0)
    model = _seq(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).to(torch.bfloat16)
    collector = ExampleCollector(model, keep_per_example=True)
    model(torch.randn(3, 5, 4, dtype=torch.bfloat16)).square().sum().backward()
    assert all(v.dtype == torch.float32 for v in collector.per_example_sq_norms().values())


def test_embedding_scale_grad_by_freq_is_refused_with_a_fix() -> None:
    model = _seq(nn.Embedding(5, 3, scale_grad_by_freq=True))
    ExampleCollector(model)
    out = model(torch.tensor([[1, 1, 2], [0, 1, 3]]))
    with pytest.raises(UnsupportedLayerError, match="scale_grad_by_freq"):
        out.sum().backward()


def test_unbatched_conv_input_is_refused() -> None:
    conv = nn.Conv1d(2, 3, 2)
    ExampleCollector(conv)
    with pytest.raises(UnsupportedLayerError, match="batched"):
        conv(torch.randn(2, 5)).sum().backward()


def test_sparse_embedding_gradient_norms_are_exact() -> None:
    torch.manual_seed(0)
    model = _seq(nn.Embedding(6, 3, sparse=True), nn.Linear(3, 2)).double()
    x = torch.randint(0, 6, (4, 5))
    y = torch.randn(4, 5, 2, dtype=torch.float64)
    collector = ExampleCollector(model, keep_per_example=True)
    sq_loss(model(x), y).sum().backward()
    ref = per_example_sq_norms(model, x, y, sq_loss)
    for pname, expected in ref.items():
        torch.testing.assert_close(collector.per_example_sq_norms()[pname], expected)
