"""The interface of every source of small batches, and what their hooks share.

A collector installs hooks on the user's model and returns additive statistics (``noisescale.stats``), never a
ratio.  The monitor and the data-parallel sync talk to every collector through ``Collector`` alone, so a new
source needs no change to either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from noisescale.stats import SmallBatchStats

__all__ = ["AnyRank", "BackwardWatch", "Collector", "HookOwner", "equal_split"]

AnyRank = Callable[[torch.Tensor], torch.Tensor]
"""The element-wise maximum of a tensor over the data-parallel ranks (a collective every rank calls together)."""


class Collector(Protocol):
    """A source of small-batch statistics, installed as hooks on the user's model.

    A collector owns its buffers and hook handles; it never sets attributes on the user's modules or tensors.
    """

    @property
    def params(self) -> Sequence[tuple[str, nn.Parameter]]:
        """The parameter tensors this collector measures, in the order of ``SmallBatchStats.small_sq_sum``."""
        ...

    @property
    def coverage(self) -> float:
        """Fraction of the model's trainable parameter entries that ``params`` covers."""
        ...

    def examples_seen(self) -> int | None:
        """Examples the hooks saw since the last reset (on this rank), or ``None`` when they cannot count them."""
        ...

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """Return the statistics gathered since the last ``reset()``.

        Args:
            batch_size: examples of the step on this process (all its micro-batches).
            micro_batch_sizes: the sizes of the micro-batches, in backward order, when they are unequal.

        Raises:
            StepError: if no backward pass reached the hooks, or ``batch_size`` contradicts what they saw.
        """
        ...

    def check_first_step(self, any_rank: AnyRank | None) -> None:
        """After the first step's ``collect``: raise ``StepError`` if the hooks missed something they must see.

        Args:
            any_rank: under data parallelism, pools a flag tensor over the ranks (every rank calls this together).
        """
        ...

    def reset(self) -> None:
        """Forget what was gathered; called once per optimizer step, after ``collect``."""
        ...

    def arm(self, armed: bool, *, step: int) -> None:
        """Arm the hooks for the optimizer step ``step`` (numbered from 1), or disarm them until armed again.

        A disarmed hook returns before any tensor operation (a step left unmeasured by the monitor's cadence
        costs a Python call per hook, nothing on the device); a backward pass of a graph built while armed is
        still measured.
        """
        ...

    def close(self) -> None:
        """Remove every hook; later backward passes of graphs built earlier are ignored."""
        ...


class BackwardWatch:
    """Tells its listeners when a backward pass that reached a collector's hooks has ended.

    Every collector calls ``touch()`` from its backward hooks; the first touch of a pass queues one callback on
    autograd's engine, which runs when the whole pass is done (every gradient accumulated).  Costs a flag test per
    hook call.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._queued = False

    def __deepcopy__(self, memo: dict[int, object]) -> BackwardWatch:
        # A deep copy of a hooked model gets hooks of its own, which tell a watch of their own: the listeners
        # (the monitor's big-batch capture) belong to the original, not to what its hooks state.
        return BackwardWatch()

    def listen(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` at the end of every backward pass from now on."""
        self._listeners.append(fn)

    def touch(self) -> None:
        """A hook of this backward pass ran (called from backward hooks)."""
        if not self._queued and self._listeners:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._ended)

    def _ended(self) -> None:
        self._queued = False
        for fn in self._listeners:
            fn()


class HookOwner:
    """What every collector does with its hooks: keep the handles, switch them off, remove them all on ``close``.

    ``enabled`` guards hooks on autograd graphs built before ``close()``, which cannot be removed from them;
    ``armed`` is checked first by every hook that starts a measurement (a forward hook, a gradient hook): while
    it is false they return at once (``arm``).
    """

    def __init__(self, watch: BackwardWatch | None = None) -> None:
        self.enabled = True
        self.armed = True
        self._handles: list[RemovableHandle] = []
        self.watch = watch if watch is not None else BackwardWatch()

    def reset(self) -> None:  # pragma: no cover - every collector overrides it
        raise NotImplementedError

    def check_first_step(self, any_rank: AnyRank | None) -> None:
        """Nothing to check by default."""
        return None

    def arm(self, armed: bool, *, step: int) -> None:
        """Arm or disarm the hooks (see ``Collector.arm``)."""
        self.armed = armed

    def close(self) -> None:
        """Remove every hook and forget what was gathered.  Idempotent."""
        self.enabled = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()


def equal_split(batch_size: int, n: int) -> list[int]:
    """Sizes of ``n`` micro-batches that split ``batch_size`` examples as evenly as possible.

    Like ``torch.tensor_split``: the first ones take the remainder.
    """
    base, rem = divmod(batch_size, n)
    return [base + (1 if i < rem else 0) for i in range(n)]
