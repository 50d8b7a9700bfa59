"""``nn.MultiheadAttention`` measured per example from inside its functional forward (``collectors.attention``).

Every case is held to a float64 loop over single examples (``tests.helpers.reference``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.helpers.reference import per_example_sq_norms
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint

import noisescale as ns
from noisescale.collectors.example import ExampleCollector
from noisescale.errors import UnsupportedLayerError

E, HEADS, T, B = 16, 4, 7, 5


class Attend(nn.Module):
    """An attention layer in the configurations ``F.multi_head_attention_forward`` computes differently."""

    def __init__(self, *, batch_first: bool, cross: bool, kdim: int | None, bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim)
        self.memory = nn.Linear(E, kdim or E)  # what cross-attention (or other key/value sizes) attends to
        self.head = nn.Linear(E, 3)
        self.batch_first, self.cross, self.separate = batch_first, cross, kdim is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, E)
        kv = self.memory(x) if (self.cross or self.separate) else x
        q = x
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        value = 2 * kv if self.cross else kv  # key and value differ: three separate products
        out, _ = self.attn(q, kv, value)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out).mean(1)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _check_against_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rtol: float) -> ExampleCollector:
    """Two steps: the first call goes through the dispatch mode and its checks, the second by the graph walk."""
    collector = ExampleCollector(model, keep_per_example=True)
    for step in range(2):
        xs = x if step == 0 else x.flip(0) * 0.5
        model.zero_grad()
        collector.reset()
        _loss(model(xs), y).sum().backward()
        got = collector.per_example_sq_norms()
        ref = {n: v for n, v in per_example_sq_norms(model, xs, y, _loss).items() if n in got or v.any()}
        assert set(got) == set(ref), "every parameter with a gradient is measured"
        for name, want in ref.items():
            torch.testing.assert_close(got[name].double(), want, rtol=rtol, atol=1e-12 * float(want.max()), msg=name)
        assert collector.coverage == 1.0 and collector.examples_seen() == x.shape[0]
    return collector


@pytest.mark.parametrize(
    ("batch_first", "cross", "kdim", "bias"),
    list(itertools.product((True, False), (False, True), (None, 12), (True, False))),
)
def test_projections_match_the_per_example_loop(batch_first: bool, cross: bool, kdim: int | None, bias: bool) -> None:
    torch.manual_seed(0)
    model = Attend(batch_first=batch_first, cross=cross, kdim=kdim, bias=bias)
    x, y = torch.randn(B, T, E), torch.randint(0, 3, (B,))
    _check_against_reference(model, x, y, rtol=1e-5).close()


def test_transformer_encoder_with_masks_under_the_monitor() -> None:
    """``nn.TransformerEncoder`` (its layers call the attention with masks) measured whole, B_simple exact."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = encoder, nn.Linear(E, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            causal = torch.ones(T, T, dtype=torch.bool).triu(1)
            padding = torch.zeros(x.shape[0], T, dtype=torch.bool)
            padding[:, -2:] = True  # the last two positions of every example are padding
            return self.head(self.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=True)[:, 0])

    model = Model().double()
    x, y = torch.randn(B, T, E, dtype=torch.float64), torch.randint(0, 3, (B,))
    _check_against_reference(model, x, y, rtol=1e-9).close()

    model.zero_grad()
    with ns.GNSMonitor(model, source="example") as monitor:
        _loss(model(x), y).mean().backward()
        m = monitor.step(batch_size=B)
    # The two-batch estimator with B small batches of one example (REFERENCE.md): G_i is example i's own gradient.
    small = float(sum(v.sum() for v in per_example_sq_norms(model, x, y, _loss).values()))
    big = sum(float(p.grad.square().sum()) for p in model.parameters())
    trace = (small / B - big) / (1.0 - 1.0 / B)
    assert m.coverage == 1.0
    assert m.trace_cov_raw == pytest.approx(trace, rel=1e-9)
    assert m.grad_sq_raw == pytest.approx(big - trace / B, rel=1e-9)


def test_unbatched_query_is_one_example() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, HEADS).double()
    collector = ExampleCollector(attn, keep_per_example=True)
    x = torch.randn(T, E, dtype=torch.float64)
    out, _ = attn(x, x, x)
    out.square().sum().backward()
    got = collector.per_example_sq_norms()
    for name, p in attn.named_parameters():
        assert got[name].shape == (1,)
        torch.testing.assert_close(got[name][0], p.grad.square().sum(), rtol=1e-10, atol=0.0)
    assert collector.examples_seen() == 1
    collector.close()


def test_checkpointed_attention_matches_the_loop() -> None:
    torch.manual_seed(0)
    inner = Attend(batch_first=True, cross=False, kdim=None, bias=True).double()

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.inner, x, use_reentrant=False)

    x, y = torch.randn(B, T, E, dtype=torch.float64), torch.randint(0, 3, (B,))
    _check_against_reference(Checkpointed(), x, y, rtol=1e-9).close()


def test_add_bias_kv_is_refused_with_out_proj_or_left_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, HEADS, add_bias_kv=True, batch_first=True))
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(MultiheadAttention with add_bias_kv=True") as e:
        ExampleCollector(model)
    assert "'1.out_proj' (used inside nn.MultiheadAttention" in str(e.value)
    collector = ExampleCollector(model, on_unsupported="ignore")
    assert [n for n, _ in collector.params] == ["0.weight", "0.bias"]
    collector.close()


def test_an_unrecognised_implementation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch that computes the projections differently (here: from a copy of the weights) is an error, not zeros."""
    original = nn.functional.multi_head_attention_forward

    def from_a_copy(*args, **kwargs):  # type: ignore[no-untyped-def]
        args = tuple(a.clone() if isinstance(a, nn.Parameter) and a.dim() == 2 else a for a in args)
        return original(*args, **kwargs)

    monkeypatch.setattr(nn.functional, "multi_head_attention_forward", from_a_copy)
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
    collector = ExampleCollector(attn)
    x = torch.randn(B, T, E)
    with pytest.raises(UnsupportedLayerError, match="does not recognise"):
        attn(x, x, x)
    assert _get_current_dispatch_mode() is None  # the dispatch mode is gone even though the forward raised
    collector.close()


def test_no_grad_forward_a_failing_forward_and_close_leave_the_layer_alone() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
    collector = ExampleCollector(attn)
    x = torch.randn(B, T, E)
    with torch.no_grad():
        attn(x, x, x)
    assert collector.examples_seen() is None
    with pytest.raises(AssertionError, match="does not match value shape"):  # torch's own error, as without hooks
        attn(x, x[:, :, :3], x)
    assert _get_current_dispatch_mode() is None  # the mode left with the failed call
    out, _ = attn(x, x, x)
    out.sum().backward()
    assert collector.examples_seen() == B
    collector.close()
    assert not attn._forward_hooks and not attn._forward_pre_hooks


def test_bf16_autocast_is_recognised_and_agrees_with_float32() -> None:
    """Autocast casts the weights (or their row blocks) before the products: the casts are followed."""
    torch.manual_seed(0)
    model = Attend(batch_first=True, cross=True, kdim=None, bias=True)  # split blocks, each cast on its own
    x, y = torch.randn(B, T, E), torch.randint(0, 3, (B,))
    collector = ExampleCollector(model, keep_per_example=True)
    results = []
    for dtype in (torch.bfloat16, torch.bfloat16, None):  # the second call goes by the graph walk
        model.zero_grad()
        collector.reset()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)
        _loss(out.float(), y).sum().backward()
        results.append(collector.per_example_sq_norms())
    collector.close()
    for low in results[:2]:
        assert set(low) == {n for n, _ in model.named_parameters()}
        for name, want in results[2].items():
            torch.testing.assert_close(low[name], want, rtol=5e-2, atol=1e-3 * float(want.max()), msg=name)


def test_a_deep_copy_of_the_model_does_not_feed_the_original_collector() -> None:
    """An EMA or evaluation copy made with copy.deepcopy runs its own copies of the hooks, not the monitor's."""
    import copy

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
    collector = ExampleCollector(attn)
    twin = copy.deepcopy(attn)
    x = torch.randn(B, T, E)
    twin(x, x, x)[0].sum().backward()
    assert collector.examples_seen() is None
    attn(x, x, x)[0].sum().backward()
    assert collector.examples_seen() == B
    collector.close()


def test_frozen_input_projection_leaves_the_output_projection_measured() -> None:
    torch.manual_seed(0)
    model = Attend(batch_first=True, cross=False, kdim=None, bias=True).double()
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    x, y = torch.randn(B, T, E, dtype=torch.float64), torch.randint(0, 3, (B,))
    collector = _check_against_reference(model, x, y, rtol=1e-9)
    assert "attn.out_proj.weight" in dict(collector.params) and "attn.in_proj_weight" not in dict(collector.params)
    collector.close()


def test_micro_batches_accumulate_like_one_batch() -> None:
    """Two backward passes before one step (gradient accumulation): the sums cover every example once."""
    torch.manual_seed(0)
    model = Attend(batch_first=False, cross=True, kdim=None, bias=True).double()
    x, y = torch.randn(2 * B, T, E, dtype=torch.float64), torch.randint(0, 3, (2 * B,))
    collector = ExampleCollector(model, keep_per_example=True)
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        _loss(model(xs), ys).sum().backward()
    got = collector.per_example_sq_norms()
    for name, want in per_example_sq_norms(model, x, y, _loss).items():
        if want.any():
            torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12 * float(want.max()), msg=name)
    assert collector.examples_seen() == 2 * B
    collector.close()
