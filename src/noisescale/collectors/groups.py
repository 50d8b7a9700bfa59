"""What the example collector's hooks keep for groups of examples: each backward pass's per-example Gram matrix
and per-example squared norms, summed over the measured parameters.

``monitor.step(groups=ids)`` names each example's group (its data source) only after backward has run, so the
hooks keep what any grouping needs: the ``(b, b)`` Gram matrix ``K_ij = <g_i, g_j>`` of the pass's ``b`` examples
(``rules.gram``), from which ``|sum_{i in s} g_i|^2 = 1_s^T K 1_s`` follows for every group at once, and, for
per-example scores (``example_ids=``), the diagonal's parts as the norm rules give them.  One backward pass is one
*part*: pairs of examples in different micro-batches (or on different ranks) are never formed, because that would
need every example's gradient kept until the step ends.

Nothing runs unless armed: the collector calls ``on_layer``/``on_norms`` only while it holds an observer, and
``GroupObserver.arm`` installs or removes it between steps.  While armed for Gram matrices the collector takes
each layer's per-example norms from their diagonals instead of running its norm rule as well (the Gram form is
never cheaper than the norm, so this halves nothing but saves the norm rule's whole pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from noisescale.collectors.rules.gram import find_gram_rule
from noisescale.collectors.rules.registry import NormRule

if TYPE_CHECKING:
    from noisescale.collectors.example import ExampleCollector

__all__ = ["GroupObserver", "PassRecord", "Taken", "unsupported_for_groups"]


@dataclass
class PassRecord:
    """One backward pass (a micro-batch on this rank).

    Attributes:
        size: its examples.
        gram: ``(size, size)`` per-example Gram matrix over the measured parameters (shares of ``p.grad``; at
            least float32), or ``None`` when not armed for it.
        norms: ``(size,)`` float64 per-example squared norms, or ``None`` when not armed for them.
    """

    size: int
    gram: torch.Tensor | None = None
    norms: torch.Tensor | None = None


@dataclass
class Taken:
    """Everything the hooks kept since the last ``take()``.

    Attributes:
        passes: the backward passes, in order.
        gram_armed, norms_armed: what the hooks were armed for.
        problem: why the Gram matrices cannot be used in this step (layers without a Gram form, layers that saw
            different numbers of examples in one pass), or ``None``.
    """

    passes: list[PassRecord] = field(default_factory=list)
    gram_armed: bool = False
    norms_armed: bool = False
    problem: str | None = None


def unsupported_for_groups(collector: ExampleCollector) -> list[str]:
    """The measured layers whose per-example Gram matrix has no registered form, as ``'name' (Class)``.

    Layers measured by hooks of their own (``nn.MultiheadAttention``) and tied weights have none: their gradient
    is assembled from several calls, whose cross terms between examples no single hook sees.
    """
    measured = {id(p) for _, p in collector.params}
    out: list[str] = []
    for layer in collector.plan.rule_layers:
        params = [p for name, p in layer.module.named_parameters() if name in layer.slots]
        if not any(id(p) in measured for p in params):
            continue
        rule = collector.current_rule(layer.module)
        if layer.tie is not None:
            out.append(f"'{layer.name}' ({type(layer.module).__name__}, a tied weight)")
        elif rule is None or find_gram_rule(rule) is None:
            out.append(f"'{layer.name}' ({type(layer.module).__name__})")
    for hooked in collector.plan.hooked_layers:
        if any(id(p) in measured for _, p in hooked.module.named_parameters()):
            out.append(f"'{hooked.name}' ({type(hooked.module).__name__}, measured by hooks of its own)")
    return out


class GroupObserver:
    """Keeps each backward pass's per-example Gram matrix and norms while armed (see the module docstring).

    Args:
        collector: the example collector to observe; it calls this observer only while ``arm`` says so.
    """

    def __init__(self, collector: ExampleCollector) -> None:
        self.collector = collector
        self.gram_armed = False
        self.norms_armed = False
        self._gram: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        self._size: int | None = None
        self._taken = Taken()
        self._closed = False
        collector.watch.listen(self._pass_ended)

    def arm(self, *, gram: bool, norms: bool) -> None:
        """Keep Gram matrices and/or per-example norms from the next backward pass on (both false: nothing runs)."""
        self.gram_armed, self.norms_armed = gram and not self._closed, norms and not self._closed
        self.collector.observer = self if (self.gram_armed or self.norms_armed) else None
        self._taken.gram_armed, self._taken.norms_armed = self.gram_armed, self.norms_armed

    def close(self) -> None:
        self._closed = True
        self.arm(gram=False, norms=False)

    # -- hooks (hot path) --------------------------------------------------------------------------------------

    def on_layer(
        self,
        module: nn.Module,
        rule: NormRule,
        inputs: tuple[object, ...],
        grad_output: torch.Tensor,
        slots: Mapping[str, int],
    ) -> Mapping[str, torch.Tensor] | None:
        if not self.gram_armed:
            return None
        form = find_gram_rule(rule)
        if form is None:
            self._taken.problem = f"no per-example Gram form for the layer {type(module).__name__} (rule {rule!r})"
            return None
        grams = form(module, inputs, grad_output)
        norms = {}
        for name, k in grams.items():
            if name in slots:
                self._add_gram(k)
            norms[name] = k.diagonal().clone()  # the norm rule's values, K_ii = |g_i|^2 (not a view: K is freed)
        return norms

    def on_norms(self, sq: torch.Tensor) -> None:
        if not self.norms_armed:
            return
        if not self._same_size(int(sq.shape[0])):
            return
        if self._norms is None:
            self._norms = sq.detach().to(torch.float64, copy=True)
        else:
            self._norms.add_(sq.detach())

    def _add_gram(self, k: torch.Tensor) -> None:
        if not self._same_size(int(k.shape[0])):
            return
        # Summed in the forms' own precision (at least float32), over a few dozen terms at most.
        if self._gram is None:
            self._gram = k.detach().clone()
        else:
            self._gram.add_(k.detach())

    def _same_size(self, b: int) -> bool:
        if self._size is None:
            self._size = b
        elif b != self._size:
            self._taken.problem = (
                f"layers saw different numbers of examples in one backward pass ({self._size} and {b}), so the "
                "examples of the pass cannot be told apart"
            )
            return False
        return True

    def _pass_ended(self) -> None:
        if self._size is not None:
            self._taken.passes.append(PassRecord(self._size, self._gram, self._norms))
        self._gram = self._norms = None
        self._size = None

    # -- step interface ----------------------------------------------------------------------------------------

    def take(self) -> Taken:
        """What the hooks kept since the last call; the buffers start afresh (armed as they were)."""
        taken = self._taken
        self._pass_ended()  # a pass whose end was not signalled (no hook touched the watch): keep what it has
        self._taken = Taken(gram_armed=self.gram_armed, norms_armed=self.norms_armed)
        return taken
