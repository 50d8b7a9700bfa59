"""Hand-written norms of other names, recognised by structure, identified by their first call, exact."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.norms import LayerNorm, T5LayerNorm
from tests.helpers.reference import per_example_sq_norms
from torch import nn

from noisescale.collectors.example import ExampleCollector
from noisescale.errors import UnsupportedLayerError


class ScaledNorm(nn.Module):
    """Something else under a Norm name: a fixed scale, not a normalisation."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x * self.weight


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().flatten(1).sum(1)


@pytest.mark.parametrize(
    "norm", [LayerNorm(6, True), LayerNorm(6, False), T5LayerNorm(6)], ids=["ln", "ln-nobias", "t5"]
)
def test_hand_written_norms_are_measured_exactly(norm: nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # parameters away from their initial ones, so every term counts
        for p in norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Linear(6, 3)).double()
    collector = ExampleCollector(model, keep_per_example=True)
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
    _loss(model(x), y).sum().backward()
    assert collector.coverage == 1.0
    ref = per_example_sq_norms(model, x, y, _loss)
    got = collector.per_example_sq_norms()
    assert set(got) == set(ref)
    # T5's norm computes its variance in float32 whatever the input: its own gradient carries that rounding.
    rtol = 1e-5 if isinstance(norm, T5LayerNorm) else 1e-9
    for name, values in got.items():
        torch.testing.assert_close(values, ref[name], rtol=rtol, atol=1e-13, msg=name)


def test_a_norm_named_layer_with_other_maths_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 6), ScaledNorm(6))
    collector = ExampleCollector(model)
    with pytest.raises(UnsupportedLayerError, match="ScaledNorm looks like a normalisation layer"):
        model(torch.randn(3, 4))
    collector.close()
