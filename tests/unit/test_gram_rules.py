"""Per-example gradient Gram matrices of each layer family against autograd, one example at a time, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale.collectors.rules.embedding import embedding_rule
from noisescale.collectors.rules.gram import affine_map_gram, embedding_gram, find_gram_rule, register_gram_rule
from noisescale.collectors.rules.linear import linear_rule
from noisescale.collectors.rules.norm import layer_norm_rule, rms_norm_rule
from noisescale.collectors.rules.registry import find_layer_rule


def _reference(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """``K_ij = <grad_i, grad_j>`` per parameter, each example's gradient from its own backward of ``<out_i, g_i>``."""
    rows: dict[str, list[torch.Tensor]] = {}
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for i in range(x.shape[0]):
        out = module(x[i : i + 1])
        grads = torch.autograd.grad((out * g[i : i + 1]).sum(), [p for _, p in params])
        for (n, _), grad in zip(params, grads, strict=True):
            rows.setdefault(n, []).append(grad.reshape(-1))
    return {n: torch.stack(v) @ torch.stack(v).T for n, v in rows.items()}


def _check(module: nn.Module, x: torch.Tensor) -> None:
    module = module.double()
    x = x.double() if x.is_floating_point() else x
    out = module(x)
    g = torch.randn_like(out)
    rule = find_layer_rule(module)
    assert rule is not None
    gram_rule = find_gram_rule(rule.rule)
    assert gram_rule is not None
    grams = gram_rule(module, (x,), g)
    expected = _reference(module, x, g)
    assert set(grams) == set(expected)
    norms = rule.rule(module, (x,), g)
    for name, k in grams.items():
        torch.testing.assert_close(k, expected[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(k.diagonal(), norms[name].double(), rtol=1e-10, atol=1e-12)  # the norm rule's


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_rows(bias):
    torch.manual_seed(0)
    _check(nn.Linear(5, 3, bias=bias), torch.randn(6, 5))


@pytest.mark.parametrize(
    ("t", "d_in", "d_out"),
    [(2, 16, 16), (7, 3, 4)],  # the token Gram form, then the materialised per-example form
    ids=["token-gram", "materialised"],
)
def test_linear_on_sequences_takes_either_form(t, d_in, d_out):
    torch.manual_seed(1)
    b = 4
    token_form = t * t * (d_in + d_out) * b < d_in * d_out * (t + b)
    assert token_form == (t == 2)
    _check(nn.Linear(d_in, d_out), torch.randn(b, t, d_in))
    _check(nn.Linear(d_in, d_out), torch.randn(b, 2, t, d_in))  # several position dimensions


def test_transposed_linear():
    class Conv1D(nn.Module):  # Hugging Face GPT-2's layer: x @ W + b, recognised by structure
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    torch.manual_seed(2)
    _check(Conv1D(3, 5), torch.randn(4, 6, 5))


@pytest.mark.parametrize(
    ("vocab", "padding_idx"), [(5, None), (5, 1), (200, None)], ids=["dense", "padding", "distinct-ids"]
)
def test_embedding(vocab, padding_idx):
    torch.manual_seed(3)
    emb = nn.Embedding(vocab, 4, padding_idx=padding_idx)
    idx = torch.randint(0, min(vocab, 6), (5, 7))
    idx[0, :3] = idx[1, 2]  # repeated ids inside one example and across examples
    _check(emb, idx)


def test_embedding_one_token_per_example():
    torch.manual_seed(4)
    g = torch.randn(6, 3, dtype=torch.float64)
    idx = torch.tensor([0, 2, 2, 1, 0, 3])
    k = embedding_gram(idx, g, num_embeddings=4)
    expected = (idx[:, None] == idx[None, :]).double() * (g @ g.T)
    torch.testing.assert_close(k, expected)


@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 6)], ids=["rows", "sequence"])
def test_layer_norm(shape):
    torch.manual_seed(5)
    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    _check(ln, torch.randn(*shape))


def test_rms_norm():
    torch.manual_seed(6)
    _check(nn.RMSNorm(6, eps=1e-6), torch.randn(5, 3, 6))
    _check(nn.RMSNorm(6), torch.randn(5, 6))


def test_the_builtin_rules_have_gram_forms():
    for rule in (linear_rule, embedding_rule, layer_norm_rule, rms_norm_rule):
        assert find_gram_rule(rule) is not None


def test_register_gram_rule_for_a_rule_of_ones_own():
    def my_rule(module, inputs, grad_output):  # pragma: no cover - never called here
        return {}

    @register_gram_rule(my_rule)
    def my_gram(module, inputs, grad_output):
        return affine_map_gram(inputs[0], grad_output, weight=True, bias=False)

    assert find_gram_rule(my_rule) is my_gram
    with pytest.raises(TypeError, match="norm rule"):
        register_gram_rule("linear")  # type: ignore[arg-type]
