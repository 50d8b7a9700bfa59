"""What every collector hands the estimators: additive statistics of one optimizer step's small batches.

A collector never returns a ratio.  Everything it returns is a sum (of squared norms, of counts, of inverse
sizes), so statistics from several micro-batches or several ranks combine by addition before any estimate is
computed (STYLE.md rule 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

__all__ = ["Collector", "DeviceIndex", "SmallBatchStats", "equal_split"]


@dataclass(frozen=True)
class SmallBatchStats:
    """Sufficient statistics of the small batches of one optimizer step.

    Units: gradients are measured in the units of ``p.grad`` *as if* ``p.grad`` held the mean gradient over the
    step's ``B`` examples.  A small batch ``j`` of ``b_j`` examples whose share of ``p.grad`` is ``c_j`` has the
    mean gradient ``G_j = (B / b_j) c_j``.  This makes B_simple independent of whether the loss is a mean or a
    sum and of any 1/k accumulation scaling: both only rescale ``p.grad`` and every ``G_j`` alike.

    Attributes:
        small_sq_sum: ``sum_j |G_{j,p}|^2`` for each monitored parameter tensor ``p``: a ``(P,)`` tensor, or a list
            of ``P`` Python floats when the collector summed on the host (gradients in host memory), which spares
            the CPU path a tensor it would only read back.
        n_small: number of small batches ``k``.
        inv_size_sum: ``sum_j 1 / b_j``.
        examples: examples the hooks saw in this step, or ``None`` when the source cannot count them.
    """

    small_sq_sum: torch.Tensor | list[float]
    n_small: int
    inv_size_sum: float
    examples: int | None

    def small_sq_tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """``small_sq_sum`` as a tensor (float64 when it was a list, built on ``device``)."""
        if isinstance(self.small_sq_sum, torch.Tensor):
            return self.small_sq_sum
        return torch.tensor(self.small_sq_sum, dtype=torch.float64, device=device)


class Collector(Protocol):
    """A source of small-batch statistics, installed as hooks on the user's model.

    A collector owns its buffers and hook handles; it never sets attributes on the user's modules or tensors.
    """

    @property
    def source(self) -> str:
        """Name of the source: ``"example"``, ``"microbatch"``, ``"rank"``."""
        ...

    @property
    def params(self) -> Sequence[tuple[str, nn.Parameter]]:
        """The parameter tensors this collector measures, in the order of ``SmallBatchStats.small_sq_sum``."""
        ...

    @property
    def coverage(self) -> float:
        """Fraction of the model's trainable parameter entries that ``params`` covers."""
        ...

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """Return the statistics gathered since the last ``reset()``.

        Raises:
            StepError: if no backward pass reached the hooks, or ``batch_size`` contradicts what they saw.
        """
        ...

    def reset(self) -> None:
        """Forget what was gathered; called once per optimizer step, after ``collect``."""
        ...

    def close(self) -> None:
        """Remove every hook; later backward passes of graphs built earlier are ignored."""
        ...


def equal_split(batch_size: int, n: int) -> list[int]:
    """Sizes of ``n`` micro-batches that split ``batch_size`` examples as evenly as possible.

    Like ``torch.tensor_split``: the first ones take the remainder.
    """
    base, rem = divmod(batch_size, n)
    return [base + (1 if i < rem else 0) for i in range(n)]


class DeviceIndex:
    """An integer index tensor kept on a device, rebuilt only when its content changes.

    Hooks fire in the same order every step, so a collector's slot layout repeats from step to step: building the
    index once spares an accelerator a blocking host-to-device copy per step.  One layout is remembered.
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[int, ...], tuple[int, ...] | None, torch.device] | None = None
        self._index: torch.Tensor | None = None

    def get(self, slots: Sequence[int], device: torch.device, repeats: Sequence[int] | None = None) -> torch.Tensor:
        """``slots`` as a long tensor on ``device``, each entry repeated ``repeats[i]`` times if given."""
        key = (tuple(slots), None if repeats is None else tuple(repeats), device)
        if self._index is None or key != self._key:
            index = torch.tensor(key[0], dtype=torch.long)
            if key[1] is not None:
                index = torch.repeat_interleave(index, torch.tensor(key[1], dtype=torch.long))
            self._key, self._index = key, index.to(device)
        return self._index
