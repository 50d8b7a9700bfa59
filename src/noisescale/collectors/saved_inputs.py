"""Layer inputs kept for the backward pass the way autograd keeps its own saved tensors.

The example collector needs each measured layer's inputs when the layer's output gradient arrives.  In plain
training it holds them in the backward hook's closure, which costs nothing: autograd saves the same tensors for
the weight gradient anyway.  Under saved-tensor hooks that would be wrong.  Activation checkpointing
(``torch.utils.checkpoint(..., use_reentrant=False)``) frees a block's activations after the forward pass and
recomputes them during the backward pass, and ``torch.autograd.graph.save_on_cpu`` moves them to host memory;
a closure would keep every one of them alive where it was (on a six-block checkpointed model the peak tensor
memory of a step rose x2.35).  While such hooks are active, the inputs are therefore saved through a one-line
autograd function, so the hooks pack them like any other saved tensor, and unpacked (recomputed, copied back)
when the rule needs them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Held", "SavedInputs", "keep_inputs", "saved_tensor_hooks_active"]


_ANCHOR: list[torch.Tensor] = []  # one empty leaf that requires grad: what makes autograd record the node


def _anchor() -> torch.Tensor:
    # Not the layer's output: an edge from the saving node to the layer's node would close a reference cycle
    # (layer node -> backward hook -> SavedInputs -> saving node -> layer node) that Python cannot collect.
    if not _ANCHOR:
        _ANCHOR.append(torch.empty(0, requires_grad=True))
    return _ANCHOR[0]


class _SaveForBackward(torch.autograd.Function):
    """Saves ``tensors`` on a node of its own; the node's output is never used."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:  # pragma: no cover - never reached
        return (None,) * len(ctx.needs_input_grad)


class SavedInputs:
    """A layer's ``inputs`` packed by the active saved-tensor hooks; ``unpack()`` returns them, once.

    Args:
        inputs: the layer's positional inputs; tensors are saved, anything else is kept as it is.
    """

    __slots__ = ("_layout", "_node")

    def __init__(self, inputs: tuple[object, ...]) -> None:
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        self._layout = tuple(None if isinstance(t, torch.Tensor) else t for t in inputs)
        self._node: Any = _SaveForBackward.apply(_anchor(), *tensors).grad_fn

    def unpack(self) -> tuple[object, ...]:
        """The inputs as the hooks give them back (recomputed under checkpointing); the node is let go."""
        if self._node is None:
            raise RuntimeError("the saved inputs of this layer call were already unpacked")
        tensors = iter(self._node.saved_tensors)
        self._node = None
        return tuple(next(tensors) if value is None else value for value in self._layout)


# Private, but the only way to ask whether saved-tensor hooks are active; without it, inputs are held directly.
_ACTIVE_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) are active; ``False`` while compiling."""
    # (dynamo cannot trace the query; a compiled forward holds the inputs as before)
    return _ACTIVE_HOOKS is not None and not torch.compiler.is_compiling() and _ACTIVE_HOOKS(False) is not None


def keep_inputs(inputs: tuple[object, ...]) -> Held:
    """``inputs`` themselves, or a ``SavedInputs`` while saved-tensor hooks (checkpointing, offloading) are active,
    held for the backward hook that needs them."""
    return Held(SavedInputs(inputs) if saved_tensor_hooks_active() else inputs)


# Private, but the only way to ask whether the running backward pass keeps its graph (retain_graph=True).
_KEEPS_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


class Held:
    """A layer call's inputs, held by its backward hook until the hook has used them.

    The hook lives on an autograd node, and the nodes live as long as the graph, which the loss tensor keeps
    until the training loop drops it: inputs held there for the whole backward pass kept every measured layer's
    input alive after autograd had freed its own copy, and raised the step's peak tensor memory by about a
    quarter on a one-block transformer (d=256, T=256).  So they are let go when the hook takes them, as autograd
    lets go of its saved tensors: unless the pass keeps the graph for another one (``retain_graph=True``).
    """

    __slots__ = ("_inputs",)

    def __init__(self, inputs: tuple[object, ...] | SavedInputs) -> None:
        self._inputs: tuple[object, ...] | SavedInputs | None = inputs

    def take(self) -> tuple[object, ...] | SavedInputs | None:
        """The inputs, given up unless the graph is kept; ``None`` once given up."""
        inputs = self._inputs
        if _KEEPS_GRAPH is not None and not _KEEPS_GRAPH():
            self._inputs = None
        return inputs
