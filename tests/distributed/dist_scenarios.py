"""What the spawned ranks run (DDP and FSDP2 on CPU with gloo), and the single-process references to check it.

Each scenario returns plain data: the parameters before every step, each rank's batches, and every
``Measurement.to_dict()``, so the parent process can recompute everything alone and compare ranks bit for bit.
(No ``from __future__ import annotations``: DDP checks a comm hook's ``bucket`` annotation at runtime.)
"""

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

D_IN, HIDDEN, CLASSES = 8, 16, 4
LOCAL = 6  # examples per rank and step
STEPS = 3


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_batch(step: int, rank: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(LOCAL, D_IN, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + 2 * (torch.rand(LOCAL, generator=g) < 0.3).long()  # some signal, some noise
    return x, y


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: gather the shards (collective)
        out[n.removeprefix("module.")] = full.detach().clone()
    return out


def _train(
    model: nn.Module,
    rank: int,
    world: int,
    source: str,
    *,
    micro: int = 1,
    dtype: torch.dtype = torch.float64,
    poison: tuple[int, int] | None = None,
    optimizer_step: bool = True,
    uneven: bool = False,
) -> list[dict[str, Any]]:
    """Run ``STEPS`` steps measuring with ``source``; ``poison=(step, rank)`` puts a NaN in that rank's batch.

    ``uneven``: rank 0 keeps ``LOCAL`` examples a step, the others drop a third of theirs.
    """
    monitor = ns.GNSMonitor(model, source=source)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for step in range(STEPS):
        state = _state(model)
        x, y = make_batch(step, rank, dtype)
        if uneven and rank > 0:
            x, y = x[: 2 * LOCAL // 3], y[: 2 * LOCAL // 3]
        if poison == (step, rank):
            x[0, 0] = float("nan")
        for j, (xj, yj) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            last = j == micro - 1
            sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
            with sync:
                (F.cross_entropy(model(xj), yj) / micro).backward()
        m = monitor.step(batch_size=LOCAL + (world - 1) * (2 * LOCAL // 3 if uneven else LOCAL))
        records.append({"state": state, "x": x, "y": y, "m": m.to_dict()})
        if optimizer_step and m.status != "skipped":
            opt.step()
        opt.zero_grad()
    monitor.close()
    return records


def _ddp(dtype: torch.dtype = torch.float64, **kwargs: Any) -> DDP:
    torch.manual_seed(0)
    return DDP(make_model().to(dtype), **kwargs)


class _WithSpare(nn.Module):
    """``make_model()`` as ``body``, beside a layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _ddp_with_unused() -> DDP:
    torch.manual_seed(0)
    return DDP(_WithSpare().double(), find_unused_parameters=True)


# -- gradients with and without the hook -------------------------------------------------------------------------


def _grads_after_steps(hook: str, rank: int, world: int) -> list[torch.Tensor]:
    """Float32 DDP training with accumulation; returns the flat p.grad of every step."""
    model = _ddp(torch.float32)
    calls = {"n": 0}

    def counting_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls["n"] += 1
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    monitor = None
    if hook == "monitor":
        monitor = ns.GNSMonitor(model, source="rank")
    elif hook == "user":
        model.register_comm_hook(None, counting_hook)
    elif hook == "monitor+user":
        monitor = ns.GNSMonitor(model, source="rank", comm_hook=(None, counting_hook))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for step in range(STEPS):
        micro = 1 if step == 0 else 2
        x, y = make_batch(step, rank, torch.float32)
        for j, (xj, yj) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            with contextlib.nullcontext() if j == micro - 1 else model.no_sync():
                (F.cross_entropy(model(xj), yj) / micro).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        if monitor is not None:
            monitor.step(batch_size=LOCAL * world)
        opt.step()
        opt.zero_grad()
    grads.append(torch.tensor([float(calls["n"])]))
    return grads


class _FunctionalUse(nn.Module):
    """``make_model()`` whose last layer's weights are passed to ``F.linear`` by the parent (never called itself).

    With ``rank_only`` set, the parent calls the last layer itself, on that rank only (conditional computation).
    """

    def __init__(self, rank_only: int | None = None) -> None:
        super().__init__()
        self.body = make_model()
        self.rank_only = rank_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.body[-1]
        h = self.body[:-1](x)
        if self.rank_only is None:
            return F.linear(h, head.weight, head.bias)
        if dist.get_rank() == self.rank_only:
            return head(h)
        return F.linear(h.detach(), head.weight.detach(), head.bias.detach()) + 0 * h.sum()


def _first_step_error(model: nn.Module, rank: int, world: int) -> str:
    monitor = ns.GNSMonitor(model, source="example")
    x, y = make_batch(0, rank)
    F.cross_entropy(model(x), y).backward()
    try:
        monitor.step(batch_size=LOCAL * world)
        return "no error"
    except ns.StepError as e:
        return type(e).__name__ + (": unmeasured" if "no hook of their layer saw them" in str(e) else "")
    finally:
        monitor.close()


def _errors(rank: int, world: int) -> dict[str, str]:
    """The errors each rank raises (they must be the same on every rank, not a hang)."""
    out: dict[str, str] = {}
    torch.manual_seed(0)
    out["example/functional"] = _first_step_error(DDP(_FunctionalUse().double()), rank, world)
    torch.manual_seed(0)
    out["example/one_rank_runs_the_head"] = _first_step_error(
        DDP(_FunctionalUse(rank_only=0).double(), find_unused_parameters=True), rank, world
    )
    for source, batch_size in (("example", LOCAL * world + 2), ("rank", LOCAL * world + 1)):
        model = _ddp()
        monitor = ns.GNSMonitor(model, source=source)  # type: ignore[arg-type]
        x, y = make_batch(0, rank)
        F.cross_entropy(model(x), y).backward()
        try:
            monitor.step(batch_size=batch_size)
            out[source] = "no error"
        except ns.StepError as e:
            out[source] = type(e).__name__
        monitor.close()
    return out


def ddp_worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for hook in ("plain", "monitor", "user", "monitor+user"):
        out[f"grads/{hook}"] = _grads_after_steps(hook, rank, world)
    out["rank"] = _train(_ddp(), rank, world, "rank")
    with_hook = _ddp()
    with_hook.register_comm_hook(None, allreduce_hook)  # type: ignore[arg-type]  # the user's own, registered first
    out["rank/own_hook"] = _train(with_hook, rank, world, "rank")
    # p.grad as views into DDP's buckets: the hook must still read this rank's gradient, before the all-reduce
    out["rank/bucket_view"] = _train(_ddp(gradient_as_bucket_view=True), rank, world, "rank", micro=2)
    out["rank/accum"] = _train(_ddp(), rank, world, "rank", micro=2)
    out["rank/unused"] = _train(_ddp_with_unused(), rank, world, "rank")  # the spare layer gets no gradient
    out["microbatch/accum"] = _train(_ddp(), rank, world, "microbatch", micro=2)
    out["example"] = _train(_ddp(), rank, world, "example")
    out["example/uneven"] = _train(_ddp(), rank, world, "example", uneven=True)
    for source in ("rank", "example"):
        out[f"nonfinite/{source}"] = _train(
            _ddp(torch.float32), rank, world, source, dtype=torch.float32, poison=(1, 1)
        )
    out["errors"] = _errors(rank, world)
    out["auto_sources"] = _auto_sources()
    return out


def _auto_sources() -> dict[str, str | None]:
    """What ``source="auto"`` picks under DDP: ``rank``, with or without a communication hook of the user's."""
    plain = ns.GNSMonitor(_ddp())
    hooked = _ddp()
    hooked.register_comm_hook(None, allreduce_hook)  # type: ignore[arg-type]
    fallback = ns.GNSMonitor(hooked)
    picked = {"plain": plain.source, "with_own_hook": fallback.source}
    plain.close()
    fallback.close()
    return picked


def hook_worker(rank: int, world: int) -> dict[str, Any]:
    """Only the gradient check: run with 3 ranks, where dividing by 3 and multiplying by 1/3 differ in the last bit."""
    return {f"grads/{hook}": _grads_after_steps(hook, rank, world) for hook in ("plain", "monitor")}


def fsdp_worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for name, poison in (("example", None), ("nonfinite/example", (1, 1))):
        torch.manual_seed(0)
        model = make_model().double()
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                fully_shard(layer)
        fully_shard(model)
        out[name] = _train(model, rank, world, "example", poison=poison)
    # FSDP2 with activation checkpointing (the composable API keeps the parameter names): the first two layers'
    # activations are recomputed in the backward pass, after FSDP2 gathers their parameters again.
    from torch.distributed._composable import checkpoint

    torch.manual_seed(0)
    model = make_model().double()
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            if layer is not model[-1]:
                checkpoint(layer)
            fully_shard(layer)
    fully_shard(model)
    out["example/checkpointed"] = _train(model, rank, world, "example")
    return out


# -- single-process references -------------------------------------------------------------------------------------


def explicit_grads(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy over ``(x, y)``, per parameter, in float64 (plain autograd)."""
    model = make_model().double()
    model.load_state_dict(state)
    loss = F.cross_entropy(model(x.double()), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def sq_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """``(P,)`` float64 squared norm of each parameter's gradient."""
    return torch.stack([g.double().square().sum() for g in grads])


def reference_estimate(
    state: dict[str, torch.Tensor], small_batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[ns.TwoBatchEstimate, ns.TwoBatchEstimate]:
    """Slow reference: explicit gradients of each small batch and of their union, then ``ns.two_batch_estimate``.

    Returns:
        ``(total, per_parameter)`` estimates.
    """
    small = [explicit_grads(state, x, y) for x, y in small_batches]
    sizes = [int(x.shape[0]) for x, _ in small_batches]
    total_size = sum(sizes)
    big = [sum(s * g[i] for s, g in zip(sizes, small, strict=True)) / total_size for i in range(len(small[0]))]
    small_sq = torch.stack([sq_norms(g) for g in small])  # (k, P)
    big_sq = sq_norms(big)  # (P,)
    per_param = ns.two_batch_estimate(small_sq, sizes, big_sq, total_size)
    total = ns.two_batch_estimate(small_sq.sum(1), sizes, big_sq.sum(), total_size)
    return total, per_param


def reference_uneven_example(state: dict[str, torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """The ``example`` source's units when ranks hold different numbers of examples, from explicit gradients.

    DDP averages the ranks' mean gradients, so example ``i`` of rank ``r`` (``b_r`` examples) has the share
    ``g_i / (W b_r)`` of ``p.grad``, and ``G_i = B * share`` (``SmallBatchStats``); the big batch is the sum of the
    shares.  Returns the total ``TwoBatchEstimate``.
    """
    world, total = len(batches), sum(int(x.shape[0]) for x, _ in batches)
    shares: list[list[torch.Tensor]] = []
    for x, y in batches:
        for i in range(x.shape[0]):
            g = explicit_grads(state, x[i : i + 1], y[i : i + 1])
            shares.append([gi / (world * x.shape[0]) for gi in g])
    small_sq = torch.stack([sq_norms([total * s for s in sh]).sum() for sh in shares])
    big = [sum(sh[j] for sh in shares) for j in range(len(shares[0]))]
    return ns.two_batch_estimate(small_sq, 1, sq_norms(big).sum(), total)


def single_process_example(records_by_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``GNSMonitor(source="example")`` in one process on the global batch (all ranks' examples), step by step."""
    model = make_model().double()
    monitor = ns.GNSMonitor(model, source="example")
    out = []
    for step in range(STEPS):
        model.load_state_dict(records_by_rank[0][step]["state"])
        x = torch.cat([r[step]["x"] for r in records_by_rank])
        y = torch.cat([r[step]["y"] for r in records_by_rank])
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append(monitor.step(batch_size=x.shape[0]).to_dict())
    monitor.close()
    return out
