"""The ``rank`` source: each data-parallel rank's local gradient, read just before DDP averages it.

DDP hands its gradients over in buckets; a communication hook (``noisescale.distributed``) sees each bucket
while it still holds this rank's local gradients (the sum of the rank's micro-batches under ``no_sync()``), then
calls the hook it wraps.  Per bucket, one fused ``torch._foreach_norm`` gives every parameter's local norm:
no copy of any gradient, no host synchronisation, and nothing else on the backward path.

With ``W`` ranks of ``B / W`` examples each, rank ``r``'s small batch is its local mean gradient and the big
batch is the averaged ``p.grad`` (McCandlish et al. 2018, App. A: "small = each rank's local gradient before
the all-reduce, big = the global one").  This collector returns this rank's statistics only, in the units of
its local batch; ``DataParallelSync`` sums them over the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from noisescale.collectors.base import SmallBatchStats
from noisescale.distributed import (
    CommHook,
    DataParallelSync,
    ddp_ignored_parameter_names,
    is_ddp,
    register_observing_comm_hook,
)
from noisescale.errors import ConfigError, StepError

__all__ = ["RankCollector"]


class RankCollector:
    """This rank's local gradient norms, per parameter, from a DDP communication hook.

    Assumes the wrapped hook averages the ranks' gradients, as DDP's own and its built-in hooks do (fp16/bf16
    compression included): ``p.grad`` is then the mean over ranks.

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel`` model without a communication hook.
        comm_hook: ``(state, hook)``, the user's own DDP communication hook, wrapped instead of DDP's averaging.
        sync: the monitor's ``DataParallelSync``: once the last bucket is handed over, the hook launches the
            gather of this rank's sums (asynchronously), so ``monitor.step()`` adds no round trip of its own.

    Raises:
        ConfigError: ``model`` is not DDP, or it already has a communication hook (DDP allows one; pass yours as
            ``comm_hook``).

    Note:
        DDP cannot remove a communication hook: after ``close()`` the hook stays and only passes buckets to the
        wrapped hook, at the cost of one Python call per bucket.
    """

    source = "rank"

    def __init__(
        self, model: nn.Module, *, comm_hook: CommHook | None = None, sync: DataParallelSync | None = None
    ) -> None:
        if not is_ddp(model):
            raise ConfigError(
                "source='rank' reads each rank's gradient inside DistributedDataParallel's communication hook, so "
                f"it needs the DDP-wrapped model, got {type(model).__name__}: "
                "GNSMonitor(DistributedDataParallel(model), source='rank'); under FSDP2 use source='example'"
            )
        ignored = ddp_ignored_parameter_names(model)
        self.params: list[tuple[str, nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad and n.removeprefix("module.") not in ignored
        ]
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.coverage = (sum(p.numel() for _, p in self.params) / total) if total else 0.0
        self.enabled = True
        self._slots = {id(p): i for i, (_, p) in enumerate(self.params)}
        self._index_cache: dict[tuple[int, ...], tuple[torch.Tensor, list[int] | None]] = {}
        self._idx: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []
        self._calls: dict[int, int] = {}
        self._sync = sync
        self._sums: torch.Tensor | None = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        register_observing_comm_hook(
            model, self._on_bucket, comm_hook, after_last=self._after_last if sync is not None else None
        )

    # -- hook (hot path: no host syncs; the Python work is per bucket, not per example) -------------------------

    def _on_bucket(self, bucket: Any) -> None:
        if not self.enabled:
            return
        params = bucket.parameters()
        grads = bucket.gradients()  # views into the bucket: this rank's local gradients, not yet averaged
        key = tuple(map(id, params))
        cached = self._index_cache.get(key)
        if cached is None:  # once per bucket layout (DDP rebuilds its buckets after the first step)
            keep = [j for j, p in enumerate(params) if id(p) in self._slots]
            index = torch.tensor([self._slots[id(params[j])] for j in keep], dtype=torch.long, device=grads[0].device)
            cached = self._index_cache[key] = (index, keep if len(keep) < len(params) else None)
        index, subset = cached
        if subset is not None:  # some of the bucket's parameters are not measured
            grads = [grads[j] for j in subset]
        if grads:
            low = grads[0].dtype in (torch.float16, torch.bfloat16)
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32 if low else None)  # (n,) 0-d, one kernel
            self._vals.append(torch.stack(norms))
            self._idx.append(index)
        b = bucket.index()
        self._calls[b] = self._calls.get(b, 0) + 1

    def _after_last(self) -> None:
        # Every bucket is observed: sum this rank's norms per parameter and start their gather across ranks, right
        # behind the last gradient all-reduce (asynchronous; monitor.step() waits for it).
        if self.enabled and self._sync is not None:
            self._sums = self._local_sums()
            self._pending = self._sync.start_sum(self._sums)

    def _local_sums(self) -> torch.Tensor:
        device = self._vals[0].device if self._vals else self.params[0][1].device
        sums = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        if self._vals:
            sums.index_add_(0, torch.cat(self._idx), torch.cat(self._vals).to(torch.float64).square())
        return sums

    def take_pending_sum(self) -> tuple[Any, torch.Tensor] | None:
        """The gather started by the hook for this step (``DataParallelSync.start_sum``), once; else ``None``."""
        pending, self._pending = self._pending, None
        return pending

    # -- step interface ----------------------------------------------------------------------------------------

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """This rank's statistics since the last reset: one small batch, its local gradient.

        Args:
            batch_size: examples on *this rank* in the step (``DataParallelSync`` passes the local count).
            micro_batch_sizes: unused (the micro-batches of a rank are summed in its bucket).
        """
        if not self._calls:
            raise StepError(
                "monitor.step() was called but DDP reduced no gradient since the last step; call loss.backward() "
                "before monitor.step() (under gradient accumulation, run the last micro-batch outside no_sync())"
            )
        repeated = max(self._calls.values())
        if repeated > 1:
            raise StepError(
                f"DDP all-reduced the gradients {repeated} times in this step, so its buckets no longer hold one "
                "rank's gradient: run all micro-batches but the last under ddp_model.no_sync(), or use "
                "source='microbatch'"
            )
        sums = self._sums if self._sums is not None else self._local_sums()
        return SmallBatchStats(small_sq_sum=sums, n_small=1, inv_size_sum=1.0 / batch_size, examples=None)

    def reset(self) -> None:
        self._idx = []
        self._vals = []
        self._calls = {}
        self._sums = None
        self._pending = None

    def close(self) -> None:
        self.enabled = False
        self.reset()
