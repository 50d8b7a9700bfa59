"""The big batch: ``|p.grad|^2`` per parameter, read as soon as backward has accumulated the step's gradient.

Clipping (``clip_grad_norm_``, ``clip_grad_value_``), a ``GradScaler``'s ``unscale_``, zeroing or any other change
to ``p.grad`` between the last backward pass and ``monitor.step()`` would change what ``step()`` reads there, and
Lightning and the Hugging Face Trainer clip before any callback runs.  So the norms are read at the end of the
backward pass, from a callback queued on autograd's engine (``BackwardWatch``), and re-queued once so that it runs
after the callbacks DDP and FSDP2 queue during the pass (the wait for the gradients' all-reduce or
reduce-scatter): what is read is the averaged (or sharded) gradient, exactly what backward produced.

Under gradient accumulation only the last pass of a step matters, and which one is last is only known at
``step()``.  The norms are read at every pass from the previous step's number of passes on (every pass in the
first step), so a steady loop reads them once per step, the pass the current design already made.  When a step
has fewer passes than the one before, the last pass was not read: ``step()`` reads ``p.grad`` then if it is
unchanged since that pass (same tensors, same version counters), and otherwise reports why it cannot, instead of a
wrong number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from noisescale.collectors.base import BackwardWatch
from noisescale.device_index import DeviceIndex
from noisescale.stats import BigBatchNorms, ParamSums

__all__ = ["BigBatchCapture"]

NormsOf = Callable[[Sequence[nn.Parameter]], BigBatchNorms]
"""Reads ``|p.grad|^2`` of each parameter (or this rank's part of it)."""

_Fingerprint = list[tuple[int, int] | None]


class BigBatchCapture:
    """Reads the step's accumulated gradient norms at the end of the backward pass.

    Args:
        params: every parameter that may be measured, in a fixed order.
        norms: how to read them (host floats for gradients in host memory, a device tensor otherwise, a rank's
            part under sharding).
        watch: the collectors' ``BackwardWatch``.
    """

    def __init__(self, params: Sequence[nn.Parameter], norms: NormsOf, watch: BackwardWatch) -> None:
        self.params = list(params)
        self._norms = norms
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self.enabled = True
        self.armed = True  # disarmed on the steps the monitor's cadence leaves unmeasured: nothing is read
        self._passes = 0  # backward passes in this step
        self._eager_from = 1  # read at passes >= this one (the previous step's count; every pass at first)
        self._read: tuple[int, BigBatchNorms] | None = None
        self._fingerprint: _Fingerprint | None = None
        self._every_pass = False
        self._index = DeviceIndex()
        watch.listen(self._backward_ended)

    def _backward_ended(self) -> None:
        if self.enabled and self.armed:
            # Queued now, from the pass's own final callback: runs after those DDP and FSDP2 queued during it.
            torch.autograd.Variable._execution_engine.queue_callback(self._after_finalizers)

    def _after_finalizers(self) -> None:
        if not (self.enabled and self.armed):
            return
        self._passes += 1
        if self._passes >= self._eager_from:
            self._read = (self._passes, self._norms(self.params))
            self._fingerprint = None
        else:
            self._fingerprint = self._fingerprints()

    def take(self, params: Sequence[nn.Parameter]) -> BigBatchNorms | str:
        """The norms of ``params`` (a subset of the captured ones) at the end of this step's last backward pass.

        Returns:
            The norms, or why they cannot be known: ``p.grad`` changed after the last pass, which was not read.
        """
        passes = self._passes
        if self._read is not None and self._read[0] == passes:
            return self._subset(self._read[1], params)
        if passes and self._fingerprint is not None and self._fingerprints() == self._fingerprint:
            return self._subset(self._norms(self.params), params)
        self._eager_from, self._every_pass = 1, True  # from now on every pass is read
        return (
            f"p.grad changed between the last backward pass and monitor.step() (clipping, unscaling, zeroing), in a "
            f"step with fewer backward passes ({passes}) than the one before, whose last pass was therefore not "
            "read; this step is left out and every pass is read from now on. Call monitor.step() right after the "
            "last backward pass, before anything changes p.grad"
        )

    def reset(self) -> None:
        """The step is over: the next one is expected to have as many backward passes."""
        if self._passes and not self._every_pass:
            self._eager_from = self._passes
        self._passes = 0
        self._read = None
        self._fingerprint = None

    def close(self) -> None:
        self.enabled = False
        self._read = None

    def _fingerprints(self) -> _Fingerprint:
        return [None if (g := p.grad) is None else (id(g), g._version) for p in self.params]

    def _subset(self, norms: BigBatchNorms, params: Sequence[nn.Parameter]) -> BigBatchNorms:
        if len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params)):
            return norms
        index = [self._position[id(p)] for p in params]
        pre = norms.preconditioned
        return BigBatchNorms(
            self._picked(norms.sq_norms, index),
            rank_part=norms.rank_part,
            preconditioned=self._picked(pre, index) if pre is not None else None,
        )

    def _picked(self, sq: ParamSums, index: list[int]) -> ParamSums:
        if sq.on_host:
            values = sq.floats()
            return ParamSums([values[i] for i in index])
        t = sq.tensor()
        return ParamSums(t.index_select(0, self._index.get(index, t.device)))
