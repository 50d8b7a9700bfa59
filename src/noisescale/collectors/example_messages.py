"""What the example source tells a user about layers it cannot measure: why a layer saw another number of
examples than the step holds, why the layers disagree, and what the plan leaves out (raised or warned as
``on_unsupported`` says).  Texts only: the collector decides when to raise them."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn

from noisescale.collectors.example_plan import ExamplePlan
from noisescale.errors import FALLBACK_HINT, SharedParameterError, UnsupportedLayerError

__all__ = ["AMBIGUOUS", "CountEvidence", "Policy", "apply_policy"]

Policy = Literal["error", "warn", "ignore"]

AMBIGUOUS = (
    "its input of shape {shape} starts with as many positions as examples in a model that puts positions first "
    "(batch_first=False), so which dimension holds the examples cannot be told; use batch_first=True, or a "
    "sequence length different from the batch size"
)


@dataclass(frozen=True)
class CountEvidence:
    """What the collector's hooks saw of each layer in this step, to explain an example count.

    Attributes:
        names: each layer's name in the model.
        shapes: each layer's last input shape.
        calls: backward calls per layer.
    """

    names: Mapping[nn.Module, str]
    shapes: Mapping[nn.Module, tuple[int, ...]]
    calls: Mapping[nn.Module, int]

    def label(self, module: nn.Module) -> str:
        return f"'{self.names.get(module, type(module).__name__)}' ({type(module).__name__})"

    def why_count(self, module: nn.Module, n: int, batch_size: int) -> str:
        """Why a layer saw ``n`` examples in a step of ``batch_size``, from its input's shape and its calls."""
        shape = self.shapes.get(module)
        calls = self.calls.get(module, 1)
        if shape and (shape[0] == 1 or (len(shape) == 1 and isinstance(module, nn.Embedding))):
            return (
                f"{n}. Its output is broadcast over the batch (an index of shape {shape}), so it has no per-example "
                "gradient: give it one index row per example (Hugging Face models: pass "
                "position_ids=torch.arange(T).expand(B, T))"
            )
        if calls > 1 and n == calls * batch_size:
            return f"{n}. It ran {calls} times per example (shared weights, recurrence)"
        if shape and len(shape) >= 2 and shape[1] == batch_size and shape[0] != batch_size:
            return (
                f"{n}. Its input of shape {shape} has the examples second (positions first), which no module of "
                "the model declares with batch_first=False: pass batch-first inputs"
            )
        if shape and batch_size not in shape[:2] and n % batch_size:
            return (
                f"{n}. Its input of shape {shape} has no dimension of the batch's size: it is shared by the examples "
                "(broadcast, like relative position buckets), so it has no per-example gradient"
            )
        if shape and len(shape) <= 2 and n > batch_size and n % batch_size == 0:
            return (
                f"{n}. Its {n} rows look like flattened tokens whose grouping into examples could not be traced to a "
                "(B, T, ...) reshape: reshape a batch-first tensor right before the layer, or register a rule for it"
            )
        return str(n)

    def disagreement(self, examples: Mapping[nn.Module, int], refused: Mapping[nn.Module, str], batch_size: int) -> str:
        """The layers that saw another count than ``batch_size``, or were refused, each with why."""
        parts = [
            f"{self.label(m)}: {self.why_count(m, n, batch_size)}"
            for m, n in examples.items()
            if n != batch_size and m not in refused
        ]
        parts += [f"{self.label(m)}: refused: {why}" for m, why in refused.items()]
        return (
            f"layers saw different numbers of examples in this step of {batch_size}, or were refused: "
            + "; ".join(parts)
            + ". Pass on_unsupported='warn' to measure the other layers (coverage is reported), or use "
            + FALLBACK_HINT
        )

    def wrong_batch_size(self, examples: Mapping[nn.Module, int], batch_size: int, seen: int) -> str:
        """``batch_size`` contradicts the ``seen`` examples every layer agrees on: say so, and what may explain it."""
        message = (
            f"batch_size={batch_size} was passed to step(), but the hooks saw {seen} examples since the last step; "
            "pass the number of examples of the whole optimizer step (all micro-batches)"
        )
        hints = [
            f"{self.label(m)}: {why}"
            for m, n in examples.items()
            if (why := self.why_count(m, n, batch_size)) != str(n)
        ]
        shapes = [s for s in self.shapes.values() if len(s) >= 2]
        if hints and not (shapes and all(s[1] == batch_size for s in shapes)):
            message += ". " + "; ".join(hints)
        if shapes and all(s[1] == batch_size for s in shapes):
            message += (
                f". The layers' inputs have {batch_size} second ({shapes[0]}, ...): sequence-first layers "
                "(batch_first=False, inputs of shape (T, B, ...)) are measured when a module of the model declares "
                "batch_first=False (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.LSTM); otherwise pass "
                "batch-first inputs"
            )
        return message


def apply_policy(plan: ExamplePlan, on_unsupported: Policy) -> None:
    """Raise or warn, as ``on_unsupported`` says, about what the plan leaves out."""
    if on_unsupported == "ignore":
        return
    problems = [p.describe() for p in plan.left_out if p.kind == "no_rule"]
    if problems:
        msg = (
            "no per-example norm rule for these trainable layers: " + ", ".join(problems) + ". "
            f"Register one with @noisescale.register_norm_rule(LayerClass), use {FALLBACK_HINT}, or pass "
            "on_unsupported='warn' to measure the other layers (coverage is reported)."
        )
        if on_unsupported == "error":
            raise UnsupportedLayerError(msg)
        warnings.warn(msg, stacklevel=4)
    shared = sorted({p.reason for p in plan.left_out if p.kind == "shared"})
    if shared:
        msg = (
            "these tied weights cannot be measured per example (only an nn.Embedding tied to an nn.Linear head is): "
            + "; ".join(shared)
            + f". Pass on_unsupported='warn' to leave them out (coverage is reported), or use {FALLBACK_HINT}."
        )
        if on_unsupported == "error":
            raise SharedParameterError(msg)
        warnings.warn(msg, stacklevel=4)
