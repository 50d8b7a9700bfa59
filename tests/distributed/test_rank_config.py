"""The ``rank`` source's configuration errors and its one-rank behaviour, in this process (no spawn).

A one-process gloo group is enough for DDP to accept a communication hook, so these run in a second or two.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import free_port
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_rank_source_needs_a_ddp_model() -> None:
    with pytest.raises(ns.ConfigError, match="DistributedDataParallel"):
        ns.GNSMonitor(_model(), source="rank")


def test_comm_hook_only_with_rank_source() -> None:
    with pytest.raises(ns.ConfigError, match="source='rank'"):
        ns.GNSMonitor(_model(), source="example", comm_hook=(None, lambda s, b: None))


def test_scope_norm_needs_per_example_norms() -> None:
    with pytest.raises(ns.ConfigError, match="scope='norm'"):
        ns.GNSMonitor(_model(), source="rank", scope="norm")


@pytest.mark.distributed
def test_bad_or_refused_comm_hook_is_a_config_error(one_rank_group: None) -> None:
    with pytest.raises(ns.ConfigError, match=r"must be a \(state, hook\) pair"):
        ns.GNSMonitor(DDP(_model()), source="rank", comm_hook="allreduce")  # type: ignore[arg-type]
    model = DDP(_model())
    model.register_comm_hook(None, allreduce_hook)  # type: ignore[arg-type]
    ns.GNSMonitor(model, source="rank").close()  # a hook of the user's is no obstacle: the monitor uses none
    with pytest.raises(ns.ConfigError, match="DDP refused the communication hook"):
        ns.GNSMonitor(model, source="rank", comm_hook=(None, allreduce_hook))  # a second one: DDP allows one


def _steps(model: nn.Module, monitor: Any, n: int = 2) -> list[Any]:
    out = []
    for step in range(n):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append((monitor.step(batch_size=6) if monitor is not None else None, model.module[0].weight.grad.clone()))
    return out


@pytest.mark.distributed
def test_one_rank_is_one_small_batch_undefined_with_a_warning(one_rank_group: None) -> None:
    plain = _steps(DDP(_model()), None)
    model = DDP(_model())
    monitor = ns.GNSMonitor(model, source="rank")
    with pytest.warns(RuntimeWarning, match="only 1 small batch"):
        got = _steps(model, monitor)
    for (m, grad), (_, want) in zip(got, plain, strict=True):
        assert m.status == "undefined" and m.source == "rank"
        assert torch.equal(grad, want)
    monitor.close()  # removes the per-parameter hooks: the model is left as it was
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _steps(model, None)
    assert all(torch.isfinite(g).all() for _, g in again)
