"""The rules' pure functions, on both sides of their branch thresholds, against direct float64 maths.

``test_rules.py`` runs every rule through the collector; here each form a cost model or a dtype can select is
forced or reached on purpose: the Linear ghost and materialised forms, the three embedding forms, convolution
patches, the RMSNorm epsilon and half-precision products.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale.collectors.rules.common import bmm_float
from noisescale.collectors.rules.conv import conv_patches
from noisescale.collectors.rules.embedding import embedding_form, embedding_sq_norms
from noisescale.collectors.rules.linear import sequence_linear_sq_norms, sq_norm_of_sum_over_positions
from noisescale.collectors.rules.norm import rms_norm_sq_norms

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.mark.parametrize(("t", "m", "n"), [(3, 16, 12), (2, 5, 40), (10, 3, 4), (6, 2, 2)])
def test_sq_norm_of_sum_over_positions_both_forms(t: int, m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(t * 100 + m)
    x = torch.randn(5, t, m, generator=gen, dtype=torch.float64)
    g = torch.randn(5, t, n, generator=gen, dtype=torch.float64)
    expected = torch.einsum("btn,btm->bnm", g, x).square().sum((1, 2))
    torch.testing.assert_close(sq_norm_of_sum_over_positions(x, g), expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    ("t", "d", "vocab", "form"),
    [
        (2, 3, 6, "ghost"),
        (4, 6, 9, "ghost"),
        (6, 3, 6, "dense"),
        (40, 8, 6, "dense"),
        (40, 8, 80, "dense"),
        (40, 8, 81, "ghost"),
        (400, 8, 6, "dense"),
        (500, 4, 5000, "segments"),
    ],
)
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_sq_norms_every_form(t: int, d: int, vocab: int, form: str, padding_idx: int | None) -> None:
    gen = torch.Generator().manual_seed(t + d)
    # Ids from a few values only, so examples repeat tokens, and the largest id appears (the dense buffer's edge).
    idx = torch.randint(0, min(vocab, 7), (5, t), generator=gen)
    idx[:, -1] = vocab - 1
    g = torch.randn(5, t, d, generator=gen, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(idx, vocab).double()
    if padding_idx is not None:
        onehot[..., padding_idx] = 0.0
    expected = torch.einsum("btv,btd->bvd", onehot, g).square().sum((1, 2))
    assert embedding_form(t, vocab) == form  # the cost model picks the form this case is meant to exercise
    for forced in ("ghost", "dense", "segments"):
        got = embedding_sq_norms(idx, g, padding_idx=padding_idx, num_embeddings=vocab, form=forced)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"form {forced}")
    got = embedding_sq_norms(idx, g, padding_idx=padding_idx, num_embeddings=vocab)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_embedding_form_without_vocabulary_never_dense() -> None:
    assert embedding_form(64, None) == "ghost"
    assert embedding_form(400, None) == "segments"
    with pytest.raises(ValueError, match="num_embeddings"):
        embedding_sq_norms(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 4), form="dense")


@pytest.mark.parametrize(
    ("ks", "stride", "dilation", "padding", "mode"),
    [
        ((3,), (2,), (1,), (1,), "zeros"),
        ((4,), (1,), (1,), "same", "reflect"),
        ((2, 3), (1, 2), (2, 1), (1, 2), "circular"),
        ((3, 2), (1, 1), (1, 2), "same", "replicate"),
        ((2, 2, 2), (1, 2, 1), (1, 1, 2), "valid", "zeros"),
    ],
)
def test_conv_patches_reproduce_the_convolution(
    ks: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...], padding: object, mode: str
) -> None:
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(ks)]
    torch.manual_seed(0)
    conv = conv_cls(3, 4, ks, stride=stride, dilation=dilation, padding=padding, padding_mode=mode, bias=False)
    x = torch.randn(2, 3, *(7 for _ in ks))
    patches = conv_patches(
        x, kernel_size=ks, stride=stride, dilation=dilation, padding=conv.padding, padding_mode=mode
    )  # (B, C k, L)
    out = (conv.weight.reshape(4, -1) @ patches).reshape(conv(x).shape)
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_default_eps_follows_the_computation_type() -> None:
    # Tiny inputs make eps matter: eps=None must be float32's epsilon for float32 and float64's for float64.
    x = 1e-4 * torch.randn(3, 5, 4, dtype=torch.float64)
    g = torch.randn(3, 5, 4, dtype=torch.float64)
    for dtype, eps in (
        (torch.float64, torch.finfo(torch.float64).eps),
        (torch.float32, torch.finfo(torch.float32).eps),
    ):
        x_hat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        expected = (g * x_hat).sum(1).square().sum(1)
        got = rms_norm_sq_norms(x.to(dtype), g.to(dtype), normalized_ndim=1, eps=None)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_are_summed_in_float32(dtype: torch.dtype) -> None:
    """``bmm_float``: products of half-precision values, summed in float32, against float64 maths on the same values.

    On a CPU torch has no ``bmm(out_dtype=...)``, so this runs the upcasting fallback; on a GPU the same call runs
    the half-precision kernel (``benchmarks/gpu_overhead.py`` checks it there).
    """
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 24, 40, generator=gen) * 3).to(dtype)
    g = torch.randn(4, 24, 8, generator=gen).to(dtype)
    gram = bmm_float(x, x.transpose(1, 2))
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), torch.bmm(x.double(), x.double().transpose(1, 2)), rtol=1e-5, atol=1e-4)
    for t in (24, 2):  # ghost form, then materialised
        weight, bias = sequence_linear_sq_norms(x[:, :t], g[:, :t], with_bias=True)
        assert weight.dtype == torch.float32 and bias is not None
        xd, gd = x[:, :t].double(), g[:, :t].double()
        torch.testing.assert_close(
            weight.double(), torch.einsum("btn,btm->bnm", gd, xd).square().sum((1, 2)), rtol=1e-5, atol=0.0
        )
        torch.testing.assert_close(bias.double(), gd.sum(1).square().sum(1), rtol=1e-5, atol=0.0)
    mixed = bmm_float(g.transpose(1, 2), x.float())  # operands of different dtypes are upcast
    torch.testing.assert_close(mixed.double(), torch.bmm(g.double().transpose(1, 2), x.double()), rtol=1e-5, atol=1e-4)
