"""Micro-batch statistics: the squared norm of each micro-batch's gradient under gradient accumulation.

A tensor hook on every parameter receives the gradient of each backward pass *before* it is added to
``p.grad``, so each micro-batch's share ``c_{j,p}`` is seen without copying any gradient.  Only
``|c_{j,p}|^2`` is kept per parameter and backward (one dot product each): the estimator needs
``sum_j |G_j|^2`` and ``sum_j |G_{j,p}|^2 = sum_j (B/b_j)^2 |c_{j,p}|^2`` is additive over parameters.

On a CPU each square is turned into a Python float at once.  Keeping the 0-d tensors alive until ``step()``
costs more than the dot products themselves: the small long-lived allocations interleaved with the large
short-lived gradient buffers make the C allocator return and re-request pages, and on the 64-512-512-10 MLP with
four micro-batches the minor page faults per step rose from about 80 to about 550.  On an accelerator the
squares stay on the device, because reading one would wait for the device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from noisescale.collectors.base import BackwardWatch, HookOwner, equal_split
from noisescale.device_index import DeviceIndex
from noisescale.errors import StepError
from noisescale.grad_norms import tensor_sq_norm
from noisescale.preconditioner import AdamPreconditioner, missing_sums
from noisescale.stats import ParamSums, SmallBatchStats

__all__ = ["MicrobatchCollector"]


class MicrobatchCollector(HookOwner):
    """Squared norms of the micro-batch gradients of one optimizer step.

    Each ``backward()`` between two ``step()`` calls is one micro-batch.  Their sizes default to an even split
    of the step's batch (``torch.tensor_split``-like); pass ``micro_batch_sizes`` to ``collect`` otherwise.
    Shares are weighted as if every example contributed equally to ``p.grad`` (a mean or sum loss over the
    whole step, the usual ``loss / k`` accumulation with equal micro-batches).

    Args:
        model: the model whose trainable parameters are hooked.
        watch: told of every backward pass the hooks see (``BackwardWatch``).
        preconditioner: also hand each micro-batch's gradient to it, and report the preconditioned sums
            ``sum_j (B / b_j)^2 |c_{j,p} / d_p|^2`` it takes at the end of the backward pass
            (``SmallBatchStats.preconditioned``; equal micro-batches only).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        watch: BackwardWatch | None = None,
        preconditioner: AdamPreconditioner | None = None,
    ) -> None:
        super().__init__(watch)
        self.params: list[tuple[str, nn.Parameter]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.coverage = 1.0 if self.params else 0.0
        self._handles = [p.register_hook(functools.partial(self._on_grad, i)) for i, (_, p) in enumerate(self.params)]
        self._idx: list[int] = []
        self._vals: list[float | torch.Tensor] = []  # floats for gradients in host memory
        self._counts = [0] * len(self.params)
        self._slots = DeviceIndex()  # the parameter of every norm gathered
        self._host_floats: bool | None = None  # None: floats for host memory (tests force tensors on a CPU)
        self._pre = preconditioner

    def _on_grad(self, slot: int, grad: torch.Tensor) -> None:
        if not (self.armed and self.enabled):
            return
        self.watch.touch()
        sq = tensor_sq_norm(grad)  # detached under create_graph=True
        self._idx.append(slot)
        host = grad.is_cpu if self._host_floats is None else self._host_floats
        self._vals.append(sq.item() if host else sq)  # see the module docstring
        self._counts[slot] += 1
        if self._pre is not None:
            self._pre.accumulate(self.params[slot][1], grad)

    def backward_passes(self) -> int:
        """Backward passes seen since the last reset (the most any one parameter received)."""
        return max(self._counts, default=0)

    def examples_seen(self) -> None:
        """A micro-batch's gradient does not tell how many examples it holds."""
        return None

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """Micro-batch statistics since the last reset; see ``SmallBatchStats``."""
        k = self.backward_passes()
        if k == 0:
            raise StepError(
                "monitor.step() was called but no backward pass reached the model's parameters since the last "
                "step; call loss.backward() (for every micro-batch) before monitor.step()"
            )
        if micro_batch_sizes is None:
            if k > batch_size:
                raise StepError(
                    f"saw {k} backward passes but batch_size={batch_size}: each micro-batch needs at least one "
                    "example; pass the number of examples of the whole optimizer step"
                )
            sizes = equal_split(batch_size, k)
        else:
            sizes = [int(s) for s in micro_batch_sizes]
            if len(sizes) != k or sum(sizes) != batch_size or min(sizes) <= 0:
                raise StepError(
                    f"micro_batch_sizes={list(sizes)} must list {k} positive sizes (one per backward seen) that "
                    f"sum to batch_size={batch_size}"
                )
        weights = self._weights(batch_size, sizes)
        preconditioned, reason = self._preconditioned(sizes, weights)
        return SmallBatchStats(
            small_sq_sum=self._summed(self._vals, weights),
            n_small=k,
            inv_size_sum=sum(1.0 / s for s in sizes),
            examples=None,
            preconditioned=preconditioned,
            preconditioned_reason=reason,
        )

    def _preconditioned(self, sizes: list[int], weights: list[float]) -> tuple[ParamSums | None, str | None]:
        """The preconditioned sums in the step's units, or NaNs and why there are none (``missing_sums``)."""
        pre = self._pre
        if pre is None:
            return None, None
        if len(set(sizes)) > 1:  # the buffer sums the squares of all micro-batches with one weight
            return missing_sums(len(self.params)), (
                f"the preconditioned noise scale needs micro-batches of equal size, got {sizes}: the squares of "
                "their gradients are summed before Adam's divisor of the step is known"
            )
        sums = pre.small_sums([p for _, p in self.params])
        return sums.scaled(weights[0]), pre.reason

    def _summed(self, vals: list[float | torch.Tensor], weights: list[float]) -> ParamSums:
        """``sum_j (B / b_j)^2 |c_{j,p}|^2`` per parameter, from the squares gathered in ``_idx``'s order."""
        if all(isinstance(v, float) for v in vals):
            host = [0.0] * len(self.params)
            for slot, value, weight in zip(self._idx, vals, weights):
                host[slot] += weight * float(value)
            return ParamSums(host)
        return ParamSums(self._device_sums(vals, weights))

    def _weights(self, batch_size: int, sizes: list[int]) -> list[float]:
        """``(B / b_j)^2`` for each gathered square, ``j`` its micro-batch: the n-th gradient a parameter received."""
        if len(set(sizes)) == 1:
            return [(batch_size / sizes[0]) ** 2] * len(self._idx)
        weights: list[float] = []
        seen = [0] * len(self.params)
        for slot in self._idx:
            weights.append((batch_size / sizes[seen[slot]]) ** 2)
            seen[slot] += 1
        return weights

    def _device_sums(self, squares: list[float | torch.Tensor], weights: list[float]) -> torch.Tensor:
        """The weighted squares summed per parameter on the device that holds them (one ``index_add_``)."""
        device = next(v.device for v in squares if isinstance(v, torch.Tensor))
        # Parameters spread over host and device memory leave a mix of floats and tensors; stack promotes dtypes.
        vals = torch.stack(
            [v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64, device=device) for v in squares]
        )
        sums = torch.zeros(len(self.params), dtype=vals.dtype, device=device)
        index = self._slots.get(self._idx, device)
        if len(set(weights)) == 1:
            sums.index_add_(0, index, vals, alpha=weights[0])
        else:
            sums.index_add_(0, index, vals * torch.tensor(weights, dtype=vals.dtype, device=device))
        return sums

    def reset(self) -> None:
        self._idx = []
        self._vals = []
        self._counts = [0] * len(self.params)
