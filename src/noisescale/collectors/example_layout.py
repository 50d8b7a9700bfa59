"""Where the examples are in a layer's input: checked, not assumed.

The norm rules read the leading dimension of a layer's first input as the examples.  Three layouts break that,
and each is recognised here from what the model itself shows, so the rules get their input the right way round:

* **Keyword inputs** (``self.fc(input=h)``): bound to the layer's ``forward`` signature, so the rule's
  ``inputs[0]`` is the input whatever way it was passed.
* **Positions first** (``(T, N, ...)``, as in ``nn.TransformerEncoder(batch_first=False)`` and PyTorch's
  word-language-model example): a module with ``batch_first=False`` (``nn.MultiheadAttention``, ``nn.LSTM``,
  ``nn.TransformerEncoderLayer``, ...) declares it; every layer whose input starts with the same ``(T, N)`` then
  has its examples on the second dimension.  When ``T == N`` a batch-first layer cannot be told from a
  positions-first one, and such a layer is refused, with that reason, rather than guessed.
* **Flattened tokens** (OPT reshapes ``(B, T, d)`` to ``(B T, d)`` before its MLP): a 2-D input that is a plain
  reshape of a tensor with more leading dimensions (seen on the tensor's view base, or on the reshape's autograd
  node), or that follows such a layer's output through element-wise operations only (an activation, dropout, a
  gated product), is read as ``(B, T, d)``, rows grouped example by example, as the reshape laid them out.  The
  examples counted this way are checked against the step's batch size like every other layer's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Layout",
    "LayoutEvidence",
    "bind_inputs",
    "flattened_from",
    "is_reshape",
    "mark_flattened",
    "reshaped_base",
]


@functools.cache
def _signature(forward: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None


def bind_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The call's inputs in the order of ``forward``'s parameters, keyword ones included (positional when none)."""
    if not kwargs:
        return args
    sig = _signature(type(module).forward)
    if sig is None:
        return args
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError:
        return args
    bound.apply_defaults()
    values = list(bound.arguments.values())[1:]  # without self
    out: list[Any] = []
    for param, value in zip(list(sig.parameters.values())[1:], values):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            out.extend(value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            break
        else:
            out.append(value)
    return tuple(out)


class LayoutEvidence:
    """``(T, N)`` of the last input seen by a module that declares ``batch_first=False`` in this step."""

    def __init__(self) -> None:
        self.positions_first: tuple[int, int] | None = None
        self.armed = True  # the collector's cadence: nothing is looked at while disarmed

    def install(self, model: nn.Module) -> list[Any]:
        """Hook every module of ``model`` with ``batch_first=False``; returns the handles."""
        handles = []
        for module in model.modules():
            if getattr(module, "batch_first", None) is False:
                handles.append(module.register_forward_pre_hook(self._saw, with_kwargs=True))
        return handles

    def _saw(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.armed:
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # (T, N, E); a 2-D input is one unbatched sequence
            self.positions_first = (int(x.shape[0]), int(x.shape[1]))

    def reset(self) -> None:
        self.positions_first = None


# Element-wise autograd nodes through which a flattened layer's row grouping carries over unchanged.
_ELEMENTWISE = frozenset(
    {
        "GeluBackward0",
        "ReluBackward0",
        "SiluBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "LeakyReluBackward0",
        "EluBackward0",
        "HardtanhBackward0",
        "NativeDropoutBackward0",
        "MulBackward0",
        "AddBackward0",
        "SubBackward0",
        "DivBackward0",
        "ToCopyBackward0",
        "CloneBackward0",
    }
)
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0"})


_LEAD = "noisescale.flattened_lead"
"""The key, in an autograd node's ``metadata``, of the leading shape of a layer output read as flattened."""


def mark_flattened(output: torch.Tensor, lead: tuple[int, ...]) -> None:
    """Note on ``output``'s autograd node that its rows flatten ``lead``: element-wise operations from there keep
    the grouping, so a later layer reading them is grouped alike (``flattened_from``).

    Kept on the node itself, not in a table keyed by ``id(node)``: a node of a freed graph (an earlier micro-batch)
    can leave its address to a new one, which would then inherit a shape that is not its own.
    """
    node: Any = output.grad_fn  # an autograd Node (its type stub does not show ``metadata`` as a dict)
    if node is not None:
        node.metadata[_LEAD] = lead


def flattened_from(x: torch.Tensor) -> tuple[int, ...] | None:
    """The leading shape ``(B, T, ...)`` that ``x`` (2-D rows, or 1-D ids) flattens, or ``None``.

    Args:
        x: a layer's first input: a plain reshape of a wider tensor, or reached by element-wise operations from
            a reshape or from a layer output marked by ``mark_flattened``.
    """
    if x.dim() not in (1, 2) or x.shape[0] == 0:
        return None
    trailing = tuple(x.shape[1:])
    base = x._base
    if (
        base is not None
        and base.dim() > x.dim()
        and _plain_reshape(x, base)
        and tuple(base.shape[base.dim() - len(trailing) :]) == trailing
    ):
        return tuple(int(d) for d in base.shape[: base.dim() - len(trailing)])
    node = x.grad_fn
    if node is None:
        return None
    return _lead_of_node(node, x.shape[0], trailing, depth=0)


def _lead_of_node(node: Any, rows: int, trailing: tuple[int, ...], depth: int) -> tuple[int, ...] | None:
    if depth > 8:
        return None
    lead = node.metadata.get(_LEAD)
    if lead is not None:
        return lead
    name = type(node).__name__
    if name in _RESHAPES:
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if sizes is not None:
            sizes = tuple(int(s) for s in sizes)
            if len(sizes) > len(trailing) + 1 and sizes[len(sizes) - len(trailing) :] == trailing:
                lead = sizes[: len(sizes) - len(trailing)]
                if _prod(lead) == rows:
                    return lead
        return None
    if name not in _ELEMENTWISE:
        return None
    found: tuple[int, ...] | None = None
    for parent, _ in node.next_functions:
        if parent is None or type(parent).__name__ == "AccumulateGrad":
            continue  # a constant or a parameter broadcast over the rows
        lead = _lead_of_node(parent, rows, trailing, depth + 1)
        if lead is None or (found is not None and lead != found):
            return None
        found = lead
    return found


def _plain_reshape(x: torch.Tensor, base: torch.Tensor) -> bool:
    return (
        x.numel() == base.numel()
        and x.is_contiguous()
        and base.is_contiguous()
        and x.storage_offset() == base.storage_offset()
    )


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


@dataclass(frozen=True)
class Layout:
    """How to hand one call's input and output gradient to the rule.

    Attributes:
        transpose: examples on the second dimension (positions first): swap the first two.
        lead: the leading shape a flattened input stands for (``(B, T)``), or ``None``.
        ambiguous: positions first with as many positions as examples: which dimension holds the examples of
            this layer cannot be told.
    """

    transpose: bool = False
    lead: tuple[int, ...] | None = None
    ambiguous: bool = False

    def apply(self, inputs: tuple[Any, ...], grad: torch.Tensor) -> tuple[tuple[Any, ...], torch.Tensor]:
        """The rule's view of ``inputs`` (the first one) and of the output gradient."""
        x = inputs[0]
        assert isinstance(x, torch.Tensor)
        if self.lead is not None:
            x = x.reshape(*self.lead, *x.shape[1:])
            grad = grad.reshape(*self.lead, *grad.shape[1:])
        if self.transpose:
            x, grad = x.transpose(0, 1), grad.transpose(0, 1)
        return (x, *inputs[1:]), grad

    def apply_inputs(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """The rule's view of ``inputs`` alone (the first one)."""
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or (self.lead is None and not self.transpose):
            return inputs
        if self.lead is not None:
            x = x.reshape(*self.lead, *x.shape[1:])
        if self.transpose:
            x = x.transpose(0, 1)
        return (x, *inputs[1:])

    @staticmethod
    def of(x: object, evidence: tuple[int, int] | None, lead: tuple[int, ...] | None) -> Layout:
        """The layout of an input ``x`` given the positions-first evidence and the flattened shape, if any."""
        if not isinstance(x, torch.Tensor):
            return _BATCH_FIRST
        shape = tuple(lead) if lead is not None else tuple(x.shape[:2]) if x.dim() >= 2 else None
        if evidence is not None and shape is not None and len(shape) >= 2 and shape[:2] == evidence:
            if evidence[0] == evidence[1]:
                return Layout(lead=lead, ambiguous=True)
            return Layout(transpose=True, lead=lead)
        return _BATCH_FIRST if lead is None else Layout(lead=lead)


_BATCH_FIRST = Layout()


def reshaped_base(output: torch.Tensor, base: torch.Tensor, inputs: tuple[object, ...]) -> torch.Tensor | None:
    """``base`` (``output._base``) if ``output`` is a pure reshape of it (same elements, same order) computed inside
    the layer; ``None`` otherwise (a partial or permuted view, or a view of an input)."""
    if base.grad_fn is None or base.numel() != output.numel():
        return None
    if not (output.is_contiguous() and base.is_contiguous()) or output.storage_offset() != base.storage_offset():
        return None
    if any(isinstance(t, torch.Tensor) and (t is base or t._base is base) for t in inputs):
        return None
    return base


def is_reshape(node: object) -> bool:
    """Whether ``node`` (a ``grad_fn``) is a view or reshape."""
    return node is not None and type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
