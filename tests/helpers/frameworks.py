"""The plain training loop the framework integrations are checked against, and how their series are compared.

A step is a list of micro-batches ``(x, y)``; the loop does what every framework does for one optimizer step:
``(loss / k).backward()`` per micro-batch, ``monitor.step(batch_size=B)``, optional clipping by norm, SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import noisescale as ns

Step = Sequence[tuple[torch.Tensor, torch.Tensor]]
COMPARED = ("b_simple", "b_simple_low", "b_simple_high", "b_simple_raw", "grad_sq_raw", "trace_cov_raw")


def tiny_net(seed: int = 0, d_in: int = 6, hidden: int = 8) -> nn.Module:
    """A two-layer MLP with a seeded initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def regression_data(n: int = 32, d_in: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = x[:, :1] * 0.7 - x[:, 1:2] + 0.3 * torch.randn(n, 1, generator=g)
    return x, y


def steps_of(x: torch.Tensor, y: torch.Tensor, micro: int, accumulation: int) -> list[list[tuple[torch.Tensor, ...]]]:
    """The data in order, cut into micro-batches of ``micro`` rows, grouped ``accumulation`` to a step."""
    batches = [(x[i : i + micro], y[i : i + micro]) for i in range(0, len(x), micro)]
    return [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]


def row(m: ns.Measurement) -> dict[str, Any]:
    """The numbers of a measurement that the comparisons look at."""
    out: dict[str, Any] = {
        "step": m.step,
        "examples": m.examples,
        "batch_size": m.batch_size,
        "status": m.status,
        "source": m.source,
    }
    out.update({c: getattr(m, c) for c in COMPARED})
    return out


def plain_series(
    net: nn.Module,
    steps: Sequence[Step],
    *,
    lr: float,
    clip: float | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.mse_loss,
    **monitor_kwargs: Any,
) -> tuple[list[dict[str, Any]], nn.Module]:
    """Train ``net`` with plain SGD over ``steps`` and measure every step; returns the rows and the trained net."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    rows = []
    with ns.GNSMonitor(net, **monitor_kwargs) as monitor:
        for step in steps:
            k = len(step)
            for x, y in step:
                (loss_fn(net(x), y) / k).backward()
            rows.append(row(monitor.step(batch_size=sum(len(x) for x, _ in step))))
            if clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return rows, net


def assert_same_series(got: Sequence[dict[str, Any]], want: Sequence[dict[str, Any]], *, rel: float = 1e-9) -> None:
    """Same steps, statuses, sizes and sources; the same numbers within ``rel`` (``None`` where undefined)."""
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        for key in ("step", "examples", "batch_size", "status", "source"):
            assert g[key] == w[key], (i, key, g[key], w[key])
        for key in COMPARED:
            a, b = g[key], w[key]
            if b is None or a is None:
                assert a is None and b is None, (i, key, a, b)
            else:
                assert math.isclose(a, b, rel_tol=rel, abs_tol=0.0) or (math.isinf(a) and a == b), (i, key, a, b)
