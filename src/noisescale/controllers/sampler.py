"""``AdaptiveBatchSampler``: a batch sampler whose batch size may change between batches, sharded over ranks.

The examples form one stream: epoch after epoch, each a fresh permutation of the dataset (seeded by
``seed + epoch``).  A step of ``B`` examples takes the next ``B`` positions of the stream, and rank ``r`` of ``W``
gets the ``r``-th of its ``W`` equal slices.  So whatever the batch sizes, the ranks' shards are disjoint and every
example is used exactly once per epoch; a batch that reaches the end of an epoch continues into the next one
(no short last batch, no dropped examples).  So that such a batch holds no example twice, the next epoch's
order puts first the examples that are not in the old epoch's tail (a stable reordering of its permutation).
The position is counted in examples; with that tail, it is all ``state_dict()`` needs to resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from noisescale.errors import ConfigError

__all__ = ["AdaptiveBatchSampler"]

_STATE_VERSION = 1


def _world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one (read only, no collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices of each step's batch; ``batch_size`` may be changed between batches.

    ``batch_size`` counts the examples of the whole step on all ranks (like ``GNSMonitor.step(batch_size=)``);
    each rank gets ``batch_size / num_replicas`` of them.  Use it as ``DataLoader(dataset, batch_sampler=sampler)``
    or pull batches yourself with ``next_batch()``.  Iterating yields batches until the current epoch is used up
    (the last one may reach into the next epoch); the next iteration continues from there.

    With a ``DataLoader`` that has worker processes, batches are drawn ahead of use (``prefetch_factor`` per
    worker), so a new batch size takes effect that many batches later, and ``state_dict()`` counts the batches
    drawn, not the ones trained on: for an exact resume, use ``num_workers=0`` or pull with ``next_batch()``.

    Args:
        data_source: the dataset (anything with ``len``) or its length.
        batch_size: examples per step, all ranks together; a multiple of ``num_replicas``.
        shuffle: a new random order each epoch (else the dataset order).
        seed: the permutation of epoch ``e`` is drawn from ``torch.Generator().manual_seed(seed + e)``; equal on
            every rank.
        num_replicas, rank: the data-parallel world; default: from ``torch.distributed`` when it is initialised,
            else ``1, 0``.

    Raises:
        ConfigError: an empty dataset, a batch larger than it or not divisible by ``num_replicas``, a bad rank.
    """

    def __init__(
        self,
        data_source: int | Sized,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        n = data_source if isinstance(data_source, int) and not isinstance(data_source, bool) else None
        if n is None:
            if not isinstance(data_source, Sized):
                raise ConfigError(f"data_source must be a dataset with len() or its length, got {data_source!r:.80}")
            n = len(data_source)
        if n <= 0:
            raise ConfigError(f"the dataset is empty (length {n}): there is nothing to sample")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        world, me = _world()
        self.num_replicas = world if num_replicas is None else num_replicas
        self.rank = me if rank is None else rank
        if isinstance(self.num_replicas, bool) or not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ConfigError(f"num_replicas must be an int >= 1, got {self.num_replicas!r}")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.num_replicas):
            raise ConfigError(f"rank must be an int in [0, {self.num_replicas}), got {self.rank!r}")
        self.n = n
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.examples = 0
        self._orders: dict[int, torch.Tensor] = {}
        # (epoch, tail, head): the step that entered ``epoch`` held ``tail`` (the old epoch's last examples) and
        # its first ``head`` positions; ``_order(epoch)`` keeps those positions clear of ``tail``.
        self._boundary: tuple[int, list[int], int] | None = None
        self._batch_size = self._check(batch_size)

    def _check(self, b: object) -> int:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ConfigError(f"batch_size must be a positive int (examples per step, all ranks), got {b!r}")
        if b % self.num_replicas:
            raise ConfigError(
                f"batch_size={b} does not split evenly over {self.num_replicas} ranks; use a multiple of "
                f"{self.num_replicas}, e.g. {-(-b // self.num_replicas) * self.num_replicas}"
            )
        if b > self.n:
            raise ConfigError(
                f"batch_size={b} is larger than the dataset ({self.n:,} examples): one step would use an example "
                f"twice; use at most {self.n - self.n % self.num_replicas}"
            )
        return b

    @property
    def batch_size(self) -> int:
        """Examples per step, all ranks together; set it between batches."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, b: int) -> None:
        self._batch_size = self._check(b)

    @property
    def epoch(self) -> int:
        """The epoch the next example comes from."""
        return self.examples // self.n

    def _order(self, epoch: int) -> torch.Tensor:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                order = torch.arange(self.n)
            if self._boundary is not None and self._boundary[0] == epoch:
                _, tail, head = self._boundary
                clash = torch.zeros(self.n, dtype=torch.bool)
                clash[torch.tensor(tail, dtype=torch.long)] = True
                free = order[~clash[order]]  # the permutation's order, without the tail's examples
                first = free[:head]
                rest = torch.ones(self.n, dtype=torch.bool)
                rest[first] = False
                order = torch.cat([first, order[rest[order]]])
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def _span(self, start: int, count: int) -> list[int]:
        """Stream positions ``start .. start + count - 1`` as dataset indices (across at most two epochs)."""
        out: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            out += self._order(epoch)[offset : offset + take].tolist()
            start += take
            count -= take
        return out

    def next_batch(self) -> list[int]:
        """This rank's indices of the next step, and advance by ``batch_size`` examples."""
        p, b = self.examples, self._batch_size
        epoch, offset = divmod(p, self.n)
        if offset + b > self.n:  # this step enters the next epoch: every rank records the same boundary
            tail = self._order(epoch)[offset:].tolist()
            self._boundary = (epoch + 1, tail, offset + b - self.n)
            self._orders.pop(epoch + 1, None)
        share = b // self.num_replicas
        batch = self._span(p + self.rank * share, share)
        self.examples += b
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        end = (self.epoch + 1) * self.n
        while self.examples < end:
            yield self.next_batch()

    def __len__(self) -> int:
        """Batches left in the current epoch at the current batch size (an estimate once it changes)."""
        left = (self.epoch + 1) * self.n - self.examples
        return -(-left // self._batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "examples": self.examples,
            "batch_size": self._batch_size,
            "n": self.n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "boundary": None if self._boundary is None else list(self._boundary),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; the dataset length, seed, order and world size must be the same."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"not an AdaptiveBatchSampler state of version {_STATE_VERSION}: {state!r:.200}")
        mine = {"n": self.n, "seed": self.seed, "shuffle": self.shuffle, "num_replicas": self.num_replicas}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"the saved sampler state was for another setup ({detail}); construct it the same way")
        self._batch_size = self._check(int(state["batch_size"]))
        self.examples = int(state["examples"])
        b = state.get("boundary")
        self._boundary = None if b is None else (int(b[0]), [int(i) for i in b[1]], int(b[2]))
        self._orders = {}

    def __repr__(self) -> str:
        return (
            f"AdaptiveBatchSampler(n={self.n:,}, batch_size={self._batch_size}, examples={self.examples:,}, "
            f"rank={self.rank}/{self.num_replicas})"
        )
