"""The monitor on a ``torch.compile``d model measures what it measures on the eager one.

The ``aot_eager`` backend runs dynamo and AOTAutograd (what changes the hooks' world) without generating code, so
these tests need no C++ compiler and take seconds.
"""

import pytest
import torch
from torch import nn

import noisescale as ns


def _make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))


def _measure(model: nn.Module, monitor: ns.GNSMonitor, k: int) -> list[float | None]:
    g = torch.Generator().manual_seed(1)
    out: list[float | None] = []
    for _ in range(2):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            (nn.functional.cross_entropy(model(xs), ys) / k).backward()
        m = monitor.step(batch_size=32)
        out += [m.grad_sq_raw, m.trace_cov_raw, *(v.trace_cov_raw for v in m.layers.values())]
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-then-compile", "compile-then-monitor"])
@pytest.mark.parametrize("source", ["example", "microbatch"])
def test_compiled_model_gives_the_eager_measurement(source: str, monitor_first: bool) -> None:
    torch._dynamo.reset()
    k = 2 if source == "microbatch" else 1
    eager = _make()
    expected = _measure(eager, ns.GNSMonitor(eager, source=source), k)

    model = _make()
    if monitor_first:
        monitor = ns.GNSMonitor(model, source=source)
        model.compile(backend="aot_eager")
    else:
        model.compile(backend="aot_eager")
        nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long)).backward()
        model.zero_grad(set_to_none=True)  # compiled and run once before the monitor's hooks exist
        monitor = ns.GNSMonitor(model, source=source)
    got = _measure(model, monitor, k)
    monitor.close()
    assert len(got) == 2 * (2 + 6) and all(v is not None for v in got)
    assert got == pytest.approx(expected, rel=1e-5)
    torch._dynamo.reset()


def _make_attention() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 4, 3))


def test_compiled_model_with_attention_gives_the_eager_measurement() -> None:
    """``nn.MultiheadAttention``'s hooks run eagerly (graph breaks), and so does the forward they watch."""
    torch._dynamo.reset()

    def measure(model: nn.Module, monitor: ns.GNSMonitor) -> list[float | None]:
        g = torch.Generator().manual_seed(1)
        out: list[float | None] = []
        for _ in range(2):  # the first call is checked by the dispatch mode, the second goes by the graph walk
            x, y = torch.randn(6, 4, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            m = monitor.step(batch_size=6)
            out += [m.grad_sq_raw, m.trace_cov_raw, *(v.trace_cov_raw for v in m.layers.values())]
            model.zero_grad(set_to_none=True)
        monitor.close()
        return out

    eager = _make_attention()
    expected = measure(eager, ns.GNSMonitor(eager, source="example"))
    model = _make_attention()
    monitor = ns.GNSMonitor(model, source="example")
    model.compile(backend="aot_eager")
    got = measure(model, monitor)
    assert monitor.coverage == 1.0 and all(v is not None for v in got)
    assert got == pytest.approx(expected, rel=1e-4)
    torch._dynamo.reset()
