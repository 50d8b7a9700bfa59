"""An input embedding tied to the output head is measured exactly, cross term included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.reference import per_example_sq_norms
from torch import nn

import noisescale as ns
from noisescale.collectors.example import ExampleCollector
from noisescale.errors import SharedParameterError

B, T, V, D = 6, 5, 11, 4


class TinyLM(nn.Module):
    """Token embedding -> LayerNorm -> Linear + tanh -> head, with the head's weight tied to the embedding."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.ln(self.emb(idx)))))


def token_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss: cross-entropy summed over the positions, ``(B,)``."""
    if out.dim() == 2:
        return F.cross_entropy(out, y.long(), reduction="none")
    return F.cross_entropy(out.transpose(1, 2), y.long(), reduction="none").sum(1)


@pytest.mark.parametrize("shape", [(B, T), (B,)], ids=["sequence", "one-token"])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("k", [1, 2])
def test_tied_weight_per_example_norms_match_the_reference(shape, padding_idx, k) -> None:
    torch.manual_seed(0)
    model = TinyLM(padding_idx).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, shape, generator=gen)
    if padding_idx is not None:
        x.view(B, -1)[:, 0] = padding_idx
    y = torch.randint(0, V, shape, generator=gen)
    ref = per_example_sq_norms(model, x, y, token_loss)
    collector = ExampleCollector(model, keep_per_example=True)
    assert collector.coverage == 1.0
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        (token_loss(model(xs), ys).sum() / B).backward()  # share of each example: 1/B
    got = collector.per_example_sq_norms()
    assert set(got) == set(ref) and "emb.weight" in got
    for name, want in ref.items():
        torch.testing.assert_close(got[name] * B**2, want, rtol=1e-9, atol=1e-12)
    collector.close()


def test_monitor_measures_a_tied_model_fully() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    with ns.GNSMonitor(model, source="example") as monitor:
        x = torch.randint(0, V, (B, T))
        (token_loss(model(x), x).mean()).backward()
        m = monitor.step(batch_size=B)
    assert m.coverage == 1.0 and "emb.weight" in m.layers and "head.weight" not in m.layers
    assert m.status == "ok"


def test_other_ties_are_still_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    with pytest.raises(SharedParameterError, match=r"only an nn\.Embedding tied to an nn\.Linear"):
        ExampleCollector(model)


class AliasedBiasHead(nn.Module):
    """BERT's LM head: the decoder's bias is also registered on the head itself (one Parameter, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(4, 6, bias=False)
        self.bias = nn.Parameter(torch.zeros(6))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


def test_a_bias_registered_twice_is_reported_as_shared_not_as_a_layer_without_rule() -> None:
    model = nn.Sequential(nn.Linear(3, 4), AliasedBiasHead())
    with pytest.raises(SharedParameterError, match=r"parameter shared by \['1.bias', '1.decoder.bias'\]") as e:
        ExampleCollector(model)
    assert "no per-example norm rule" not in str(e.value)
    collector = ExampleCollector(model, on_unsupported="ignore")
    assert [n for n, _ in collector.params] == ["0.weight", "0.bias", "1.decoder.weight"]
    collector.close()
