"""Data-parallel rank statistics: each rank's local gradient, read just before DDP averages it.

Each measured parameter gets a post-accumulate-grad hook.  PyTorch runs it inside the parameter's
``AccumulateGrad`` node, right after ``p.grad`` has taken in this backward's gradient and before the node's
post hooks, where DDP copies the gradient into its bucket and launches the all-reduce.  So the hook sees this
rank's local gradient (the sum of the rank's micro-batches under ``no_sync()``), squares its norm with one dot
product, and never touches DDP's communication: DDP keeps its fused C++ averaging, the gradients stay the
same bits as without the monitor, and the user stays free to register any communication hook.

With ``W`` ranks of ``B / W`` examples each, rank ``r``'s small batch is its local mean gradient and the big
batch is the averaged ``p.grad`` (McCandlish et al. 2018, App. A: "small = each rank's local gradient before
the all-reduce, big = the global one").  This collector returns this rank's statistics only, in the units of
its local batch; ``DataParallelSync`` sums them over the ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from noisescale.collectors.base import BackwardWatch, HookOwner
from noisescale.device_index import DeviceIndex
from noisescale.distributed import CommHook, DataParallelSync, ddp_ignored_parameter_names, is_ddp, register_comm_hook
from noisescale.errors import FALLBACK_HINT, ConfigError, StepError
from noisescale.grad_norms import tensor_sq_norm
from noisescale.preconditioner import AdamPreconditioner
from noisescale.stats import ParamSums, PendingSum, SmallBatchStats

__all__ = ["RankCollector"]


class RankCollector(HookOwner):
    """This rank's local gradient norms, per parameter, read as DDP receives each gradient.

    Assumes DDP averages the ranks' gradients, as it does by default and with its built-in communication hooks
    (fp16/bf16 compression included): ``p.grad`` is then the mean over ranks.

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel`` model.
        comm_hook: ``(state, hook)``, a DDP communication hook to register on ``model`` (the same as calling
            ``model.register_comm_hook(state, hook)`` yourself, which works as well).
        sync: the monitor's ``DataParallelSync``: at the end of each synchronising backward pass, the gather of
            this rank's sums is launched (asynchronously, behind DDP's all-reduces), so ``monitor.step()`` adds no
            round trip of its own.
        watch: told of every backward pass the hooks see (``BackwardWatch``).
        preconditioner: also hand this rank's gradient to it, and report the preconditioned square
            ``|g_p / d_p|^2`` it takes at the end of the backward pass (``SmallBatchStats.preconditioned``).

    Raises:
        ConfigError: ``model`` is not DDP, or ``comm_hook`` is malformed or cannot be registered.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        comm_hook: CommHook | None = None,
        sync: DataParallelSync | None = None,
        watch: BackwardWatch | None = None,
        preconditioner: AdamPreconditioner | None = None,
    ) -> None:
        if not is_ddp(model):
            raise ConfigError(
                "the rank statistics read each rank's gradient before DistributedDataParallel averages it, so they "
                f"need the DDP-wrapped model, got {type(model).__name__}: pass DistributedDataParallel(model)"
            )
        super().__init__(watch)
        if comm_hook is not None:
            register_comm_hook(model, comm_hook)
        ignored = ddp_ignored_parameter_names(model)
        self.params: list[tuple[str, nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad and n.removeprefix("module.") not in ignored
        ]
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.coverage = (sum(p.numel() for _, p in self.params) / total) if total else 0.0
        self._ddp = model
        self._sync = sync
        self._device = self.params[0][1].device if self.params else torch.device("cpu")
        self._latest: dict[int, torch.Tensor] = {}  # slot -> |local grad|^2 (0-d), the last synchronising pass
        self._pre = preconditioner
        self._in_backward = False
        self._sync_passes = 0
        self._with_grads = DeviceIndex()  # the slots of the parameters that got a gradient
        self._sums: torch.Tensor | None = None
        self._pending: PendingSum | None = None
        self._handles = [
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, slot))
            for slot, (_, p) in enumerate(self.params)
        ]

    # -- hook (hot path: no host syncs; one dot product per parameter and step) --------------------------------

    def _on_grad_ready(self, slot: int, param: nn.Parameter) -> None:
        if not (self.armed and self.enabled):
            return
        self.watch.touch()
        # DDP decides at forward time whether this backward synchronises (False under no_sync()): only then is
        # p.grad this rank's whole local gradient of the step.
        if not getattr(self._ddp, "require_forward_param_sync", True):
            return
        if not self._in_backward:  # first gradient of this backward pass
            self._in_backward = True
            self._sync_passes += 1
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        grad = param.grad
        if grad is None:
            return
        self._latest[slot] = tensor_sq_norm(grad)
        if self._pre is not None:  # before DDP's all-reduce overwrites p.grad with the average
            self._pre.accumulate(param, grad)

    def _after_backward(self) -> None:
        # Runs when the backward pass ends, after DDP has launched every bucket's all-reduce: the gather of this
        # rank's sums follows them on every rank in the same order, and overlaps what comes before step().
        self._in_backward = False
        if self.enabled and self._sync is not None:
            self._sums = self._local_sums()
            self._pending = self._sync.start_sum(self._sums)

    def _local_sums(self) -> torch.Tensor:
        # torch.stack promotes float32 squares beside float64 ones, so parameters of mixed dtypes need no care.
        latest = self._latest
        if len(latest) == len(self.params):  # every parameter got a gradient (the usual case): two operations
            return torch.stack([latest[slot] for slot in range(len(self.params))]).to(torch.float64)
        sums = torch.zeros(len(self.params), dtype=torch.float64, device=self._device)
        if latest:
            index = self._with_grads.get(list(latest), self._device)
            sums.index_copy_(0, index, torch.stack(list(latest.values())).to(torch.float64))
        return sums

    def examples_seen(self) -> None:
        """A rank's gradient does not tell how many examples it holds."""
        return None

    # -- step interface ----------------------------------------------------------------------------------------

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """This rank's statistics since the last reset: one small batch, its local gradient.

        Args:
            batch_size: examples on *this rank* in the step (``DataParallelSync`` passes the local count).
            micro_batch_sizes: unused (the micro-batches of a rank are summed in ``p.grad``).
        """
        if not self._sync_passes:
            raise StepError(
                "monitor.step() was called but DDP reduced no gradient since the last step; call loss.backward() "
                "before monitor.step() (under gradient accumulation, run the last micro-batch outside no_sync())"
            )
        if self._sync_passes > 1:
            raise StepError(
                f"DDP all-reduced the gradients {self._sync_passes} times in this step, so p.grad no longer holds one "
                "rank's gradient: run all micro-batches but the last under ddp_model.no_sync(), or use " + FALLBACK_HINT
            )
        sums = self._sums if self._sums is not None else self._local_sums()
        pre = self._pre
        # NaNs with a reason when missing (``missing_sums``): every rank sends as many values.
        preconditioned = pre.small_sums([p for _, p in self.params]) if pre is not None else None
        return SmallBatchStats(
            small_sq_sum=ParamSums(sums),
            n_small=1,
            inv_size_sum=1.0 / batch_size,
            examples=None,
            in_flight=self._pending,
            preconditioned=preconditioned,
            preconditioned_reason=pre.reason if pre is not None else None,
        )

    def reset(self) -> None:
        self._latest = {}
        self._sync_passes = 0
        self._sums = None
        self._pending = None
