"""Data-parallel measurement: the only core module of noisescale that touches ``torch.distributed``.

``DataParallelSync`` turns one rank's small-batch statistics into the whole job's with one tiny collective per
step (for per-rank statistics, launched at the end of the backward pass, right behind DDP's last gradient
all-reduce), "all-reduce the statistics, then compute" (STYLE.md rule 1).  Every rank then computes the same
measurement from the same numbers, bit for bit, so decisions taken from it agree across ranks.

Units (``SmallBatchStats``): DDP and FSDP2 average the ranks' gradients, so with ``W`` ranks the share of
``p.grad`` of a small batch on rank ``r`` is ``c / W``, where ``c`` is its share of that rank's local gradient.
A collector measures with the local batch size ``b_r``, giving ``(b_r / b_j) c``; the step's units want
``(B / b_j) (c / W)``, the same when every rank holds ``B / W`` examples and otherwise a factor
``(B / (W b_r))^2`` on the squared norms, which ``DataParallelSync.collect`` applies.
"""

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from noisescale.device_index import DeviceIndex
from noisescale.errors import ConfigError, StepError
from noisescale.grad_norms import sq_norms
from noisescale.stats import BigBatchNorms, ParamSums, PendingSum, SmallBatchStats

__all__ = [
    "CommHook",
    "DataParallelSync",
    "StatsSource",
    "data_parallel_sync",
    "ddp_ignored_parameter_names",
    "is_ddp",
    "register_comm_hook",
]

CommHook = tuple[Any, Callable[..., Any]]
"""A DDP communication hook and its state, as ``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``."""


# -- DDP ---------------------------------------------------------------------------------------------------------


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def ddp_ignored_parameter_names(model: nn.Module) -> set[str]:
    """Names (relative to ``model.module``) of the parameters DDP was told not to synchronise."""
    return set(getattr(model, "parameters_to_ignore", ()) or ())


def register_comm_hook(model: nn.Module, comm_hook: CommHook) -> None:
    """Register a user's ``(state, hook)`` DDP communication hook on ``model``, with clear errors.

    Raises:
        ConfigError: ``comm_hook`` is not a ``(state, callable)`` pair, or DDP refuses it (it allows one hook).
    """
    if not (isinstance(comm_hook, tuple) and len(comm_hook) == 2 and callable(comm_hook[1])):
        raise ConfigError(
            "comm_hook must be a (state, hook) pair as for ddp_model.register_comm_hook(state, hook), e.g. "
            f"(None, torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook), got {comm_hook!r}"
        )
    state, hook = comm_hook
    try:
        model.register_comm_hook(state, hook)  # type: ignore[operator]
    except RuntimeError as e:
        raise ConfigError(
            "DDP refused the communication hook passed as comm_hook= (it allows one per model, and this one may "
            f"already have one): register it once, either yourself or through the monitor ({e})"
        ) from e


# -- statistics across ranks ---------------------------------------------------------------------------------------


class StatsSource(Protocol):
    """What the sync needs of a collector (``noisescale.collectors.base.Collector`` has it)."""

    @property
    def params(self) -> Sequence[tuple[str, nn.Parameter]]: ...

    def examples_seen(self) -> int | None: ...

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats: ...


def data_parallel_sync(model: nn.Module) -> "DataParallelSync | None":
    """A ``DataParallelSync`` when ``model`` is trained data-parallel over two or more ranks, else ``None``.

    Data-parallel means a ``DistributedDataParallel`` wrapper (its process group) or parameters that are
    ``DTensor`` shards (FSDP2's ``fully_shard``; the whole job, or the mesh's group when it is one-dimensional).

    Raises:
        ConfigError: the parameters live on a device mesh that covers only part of the job (tensor or pipeline
            parallelism), which this sync does not model.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group: Any
    if is_ddp(model):
        group = model.process_group
    else:
        mesh = _first_mesh(model)
        if mesh is None:
            return None
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            group = dist.group.WORLD
        else:
            raise ConfigError(
                f"the model's parameters live on a {mesh.ndim}-D device mesh of {mesh.size()} ranks in a job of "
                f"{dist.get_world_size()}: noisescale measures data parallelism over the whole job only (DDP, or "
                "FSDP2 on a mesh of every rank)"
            )
    if dist.get_world_size(group) < 2:
        return None
    return DataParallelSync(group)


class DataParallelSync:
    """Sums the additive small-batch statistics and the big-batch squared norm over the ranks of a group.

    One collective per step: every rank gathers every rank's statistics vector (float64: ``P`` small-batch sums,
    three counts) and sums the rows in rank order, so the totals are the same bits on every rank whatever the
    backend's reduction order.  The rank statistics start that gather themselves (``start_sum``) when the backward
    pass ends, asynchronously, so that ``monitor.step()`` finds it done instead of adding a round trip.

    The big-batch norm ``|p.grad|^2`` is read at the end of the backward pass (``collectors.big_batch``): under
    DDP from the all-reduced ``p.grad``, which is the same on every rank (DDP's replicas rely on that); under
    FSDP2 each rank adds its shards' squared norms to the gathered vector (``P`` more entries).  A non-finite
    value on any rank makes the totals non-finite everywhere, so every rank skips that step.

    Per step, on the host, the totals of ``n_small`` and ``inv_size_sum`` are taken to be ``world_size`` times
    the local ones (``batch_size`` for per-example norms): the same micro-batch layout on every rank, as with a
    ``DistributedSampler``.  Reading the gathered counts back would stall the device, so that assumption (and
    that ``batch_size`` counts every rank's examples) is checked on the first step, and on every step when the
    statistics live on the CPU.

    Args:
        group: the data-parallel process group (``None`` for the default group).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._checked = False
        self._owned = DeviceIndex()  # the slots of the gradients this rank holds a part of

    def collect(
        self, source: StatsSource, batch_size: int, micro_batch_sizes: Sequence[int] | None = None
    ) -> SmallBatchStats:
        """``source.collect`` with this rank's batch size, rescaled to the whole step's units.

        Args:
            source: the active collector (its statistics are this rank's).
            batch_size: examples of the whole optimizer step, all ranks together.
            micro_batch_sizes: this rank's micro-batch sizes, if they are unequal.

        Raises:
            StepError: the local batch size cannot be known (``batch_size`` does not split evenly between the
                ranks and the hooks cannot count examples), or what the collector raises.
        """
        world = self.world_size
        local = source.examples_seen()  # exact, even for uneven splits, where the hooks count examples
        if local is None and micro_batch_sizes is not None:
            local = sum(int(s) for s in micro_batch_sizes)
        if local is None:
            if batch_size % world:
                raise StepError(
                    f"batch_size={batch_size} must count the examples of all {world} ranks and split evenly between "
                    f"them when the hooks cannot count examples ({batch_size} % {world} = {batch_size % world}); use "
                    "a DistributedSampler with drop_last=True, or pass this rank's micro_batch_sizes"
                )
            local = batch_size // world
        stats = source.collect(max(local, 1), micro_batch_sizes)
        device = source.params[0][1].device if source.params else None
        small = stats.small_sq_sum.tensor(device)  # the collective needs a tensor
        pre = stats.preconditioned.tensor(device) if stats.preconditioned is not None else None
        scale = (batch_size / (world * max(local, 1))) ** 2
        if scale != 1.0:
            small = small * scale
            pre = pre * scale if pre is not None else None
        return dataclasses.replace(
            stats, small_sq_sum=ParamSums(small), preconditioned=ParamSums(pre) if pre is not None else None
        )

    def start_sum(self, vec: torch.Tensor) -> PendingSum:
        """Launch the gather of ``vec`` from every rank (asynchronous); ``finish_sum`` gives the sum over ranks.

        The rank statistics call this when the backward pass ends, so the statistics travel right behind the
        gradients' last all-reduce instead of adding a round trip to ``monitor.step()``.
        """
        gathered = vec.new_empty(self.world_size * vec.numel())
        return _all_gather_single(gathered, vec, group=self.group), gathered

    def finish_sum(self, pending: PendingSum) -> torch.Tensor:
        """Wait for ``start_sum`` (a stream wait for NCCL, not a host sync) and sum the rows in rank order."""
        work, gathered = pending
        work.wait()
        return gathered.view(self.world_size, -1).sum(0)  # fixed order, same kernel: the same bits on every rank

    def reduce(self, stats: SmallBatchStats, big: BigBatchNorms, batch_size: int) -> tuple[SmallBatchStats, ParamSums]:
        """Sum this rank's statistics (and, for sharded gradients, its part of ``|G_B|^2``) with every other rank's.

        Args:
            stats: this rank's statistics in the whole step's units (``collect``).
            big: ``|G_B|^2`` per parameter, read at the end of the backward pass: the whole value (DDP: ``p.grad``
                is the same averaged gradient on every rank) or this rank's part (FSDP2's shards).
            batch_size: examples of the whole optimizer step, all ranks together.

        Returns:
            ``(stats, big)``: the job's statistics and the per-parameter ``|G_B|^2``, identical on every rank.

        Raises:
            StepError: on the checked steps, when the ranks' counts contradict ``batch_size`` or the assumed layout.
        """
        world = self.world_size
        small = stats.small_sq_sum.tensor().to(torch.float64)
        n_params = small.numel()
        has_pre = stats.preconditioned is not None
        if stats.in_flight is not None:  # the collector launched the gather of its sums when the backward ended
            total = self.finish_sum(stats.in_flight)
            pre = None
            if stats.preconditioned is not None:  # taken after the gradients' all-reduce: a gather of its own
                local = stats.preconditioned.tensor(small.device).to(dtype=torch.float64)
                pre = ParamSums(self.finish_sum(self.start_sum(local)))
            out = dataclasses.replace(
                stats,
                small_sq_sum=ParamSums(total),
                n_small=world * stats.n_small,
                inv_size_sum=world * stats.inv_size_sum,
                in_flight=None,
                preconditioned=pre,
            )
            return out, big.sq_norms
        parts = [small]
        if stats.preconditioned is not None:  # the preconditioned sums travel in the same gather
            parts.append(stats.preconditioned.tensor(small.device).to(dtype=torch.float64))
        if big.rank_part:  # FSDP2: each rank holds part of p.grad, so the big norm is a sum over ranks too
            parts.append(big.sq_norms.tensor(small.device).to(device=small.device, dtype=torch.float64))
        vec = torch.cat([*parts, small.new_zeros(3)])  # (P + 3,), P more for each of the two above
        # Python scalars into a device tensor: fill kernels, no host-device copy or sync.
        vec[-3] = stats.n_small
        vec[-2] = stats.inv_size_sum
        vec[-1] = stats.examples if stats.examples is not None else 0
        total = self.finish_sum(self.start_sum(vec))
        after = 2 * n_params if has_pre else n_params
        big_sums = ParamSums(total[after : after + n_params]) if big.rank_part else big.sq_norms

        if stats.per_example:  # one small batch per example, all ranks together
            n_small, inv_size_sum, examples = batch_size, float(batch_size), batch_size
        else:
            n_small, inv_size_sum, examples = world * stats.n_small, world * stats.inv_size_sum, None
        if not self._checked or total.device.type == "cpu":
            self._check(total[-3:], stats.per_example, batch_size, n_small, inv_size_sum)
        out = dataclasses.replace(
            stats,
            small_sq_sum=ParamSums(total[:n_params]),
            n_small=n_small,
            inv_size_sum=inv_size_sum,
            examples=examples,
            preconditioned=ParamSums(total[n_params : 2 * n_params]) if has_pre else None,
        )
        return out, big_sums

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a blocking broadcast; reads the result back: a host sync).

        For decisions one rank takes from numbers only it has, such as the measurement cadence a budget picks from
        its own step times, so that every rank then measures the same steps.  Every rank calls it together.
        """
        backend = str(dist.get_backend(self.group)).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(t, src=src, group=self.group)
        return int(t.item())

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``flags`` over the ranks (a blocking all-reduce): the same on every rank."""
        out = flags.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def _check(
        self, counts: torch.Tensor, per_example: bool, batch_size: int, n_small: int, inv_size_sum: float
    ) -> None:
        got_n, got_inv, got_examples = counts.tolist()  # host sync: first step only on an accelerator
        self._checked = True
        world = self.world_size
        if per_example:
            if got_examples != batch_size:
                raise StepError(
                    f"batch_size={batch_size} was passed to step(), but the hooks of the {world} ranks saw "
                    f"{int(got_examples)} examples in all since the last step; pass the examples of the whole "
                    "optimizer step, all micro-batches of all ranks (the same number on every rank)"
                )
            return
        if got_n != n_small or not math.isclose(got_inv, inv_size_sum, rel_tol=1e-9):
            raise StepError(
                f"the {world} ranks' small batches differ ({int(got_n)} small batches with sum(1/b) = {got_inv:.6g} "
                f"in all; {n_small} and {inv_size_sum:.6g} expected from this rank's): every rank must run the same "
                "number of micro-batches of the same sizes, and batch_size must count all ranks' examples"
            )

    def has_sharded_grads(self, params: Sequence[nn.Parameter]) -> bool:
        """Whether some of ``params`` have gradients sharded over the ranks (FSDP2's ``DTensor``)."""
        dtensor = _dtensor_type()
        return dtensor is not None and any(isinstance(p.grad, dtensor) for p in params)

    def big_sq_contributions(self, params: Sequence[nn.Parameter], device: torch.device) -> torch.Tensor:
        """This rank's part of ``|p.grad|^2`` per parameter, float64 ``(P,)``; summed over ranks it is the whole.

        A replicated gradient (DDP, or a DTensor replicated over a mesh dimension) counts on one rank only, so the
        sum is that rank's value exactly; a sharded one (FSDP2's ``DTensor``) counts its local shard on each rank.
        """
        owned: list[torch.Tensor] = []
        slots: list[int] = []
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            local = _local_if_owned(g, self.rank)
            if local is not None:
                owned.append(local.detach())
                slots.append(i)
        if not owned:
            return torch.zeros(len(params), dtype=torch.float64, device=device)
        sq = sq_norms(owned, device)
        if len(slots) == len(params):
            return sq
        index = self._owned.get(slots, device)
        return torch.zeros(len(params), dtype=torch.float64, device=device).index_copy_(0, index, sq)


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> Any:
    # ``all_gather_single`` (newer torch) replaces ``all_gather_into_tensor``, which now warns as deprecated.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, tensor, group=group, async_op=True)


def _local_if_owned(grad: Any, group_rank: int) -> torch.Tensor | None:
    """The local tensor of ``grad`` if this rank contributes it to the sum over ranks, else ``None``."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(grad, dtensor):
        coord = grad.device_mesh.get_coordinate()
        if coord is None:  # this rank holds no part of the mesh
            return None
        for dim, placement in enumerate(grad.placements):
            if not placement.is_shard() and coord[dim] != 0:
                return None  # a replica: the first one along this mesh dimension counts
        return grad.to_local()
    return grad if group_rank == 0 else None


def _first_mesh(model: nn.Module) -> Any:
    dtensor = _dtensor_type()
    if dtensor is None:
        return None
    for p in model.parameters():
        if isinstance(p, dtensor):
            return p.device_mesh
    return None


def _dtensor_type() -> Any:
    # No DTensor can exist unless its module was imported; looking it up avoids importing it (seconds) for DDP.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)
