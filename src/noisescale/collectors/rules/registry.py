"""Registry mapping a layer class to the rule that gives its per-example squared gradient norms.

A *norm rule* is a pure function ``rule(module, inputs, grad_output) -> {param_name: sq_norms}`` where
``inputs`` is the tuple of positional inputs the module's ``forward`` received, ``grad_output`` is the
gradient of the loss with respect to the module's (single tensor) output, and each returned tensor has
shape ``(B,)``: the squared Frobenius norm, per example ``i``, of the gradient of the loss with respect to
the parameter ``module.<param_name>`` restricted to example ``i``'s contribution.  Only parameters that
require a gradient need to be returned; the collector ignores the others.

The built-in rules use the same public decorator, so a user can add a layer of their own::

    @noisescale.register_norm_rule(MyRMSNorm)
    def my_rms_norm_rule(module, inputs, grad_output):
        ...
        return {"weight": per_example_sq_norms}

What must be proven on a module's first forward pass, and is (each reads a number back from the device, once per
layer):

* ``check=``: ``(module, inputs, output)``, run for every module of the registered classes; it raises
  ``UnsupportedLayerError`` for a call the rule cannot measure (nn.Embedding refuses positions shared by the
  batch), and may return the rule to use for that module (a hand-written norm whose maths it identified);
* ``reference=``: ``(module, inputs) -> (expected output, size of its terms)``, what the registered class's own
  ``forward`` computes.  A subclass that overrides ``forward`` keeps the rule only if its first output equals the
  reference (Whisper's positional embedding, an ``nn.Embedding`` that looks up other indices, does not); without
  a reference such a subclass has no rule;
* layers *recognised* by their structure (``recognize_layers``: Hugging Face's ``LlamaRMSNorm`` and its kin,
  which cannot be imported here) always run their family's check.

A look-alike with other maths is refused, not measured wrongly.

Two more forms cover what a per-module rule cannot:

* ``register_layer_hooks``: a layer whose parameters are used inside a function, where no submodule's hook
  reaches (``nn.MultiheadAttention``), brings hooks of its own that report per-example norms;
* ``register_tied_weights``: a weight used by two layers (an input embedding tied to its output head) brings
  the cross term between its two per-example gradients.

The collector (``collectors.example``) consults only this registry: a new layer needs no change to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "ForwardCheck",
    "LayerHooks",
    "LayerRule",
    "NormRule",
    "Recognized",
    "Reference",
    "TiedWeights",
    "find_layer_hooks",
    "find_layer_rule",
    "find_norm_rule",
    "forward_check",
    "is_norm_layer",
    "overrides_forward",
    "recognize_layers",
    "register_layer_hooks",
    "register_norm_rule",
    "register_tied_weights",
    "registered_layer_types",
    "tied_weight_forms",
]

NormRule = Callable[[nn.Module, tuple[object, ...], torch.Tensor], Mapping[str, torch.Tensor]]
"""``(module, inputs, grad_output) -> {param_name: per-example squared norms of shape (B,)}``."""

ForwardCheck = Callable[[nn.Module, tuple[object, ...], torch.Tensor], "NormRule | None"]
"""``(module, inputs, output) -> None or the rule to use``; raises ``UnsupportedLayerError`` when the rule does
not fit what the layer computed."""

Reference = Callable[[nn.Module, tuple[object, ...]], tuple[torch.Tensor, float]]
"""``(module, inputs) -> (what the registered class's forward outputs, the size of the terms it sums)``."""


@dataclass(frozen=True)
class LayerRule:
    """How one module is measured: its rule and what must be proven on its first call.

    Attributes:
        rule: the norm rule.
        normalization: whether the layer counts as a normalisation layer (``scope="norm"``).
        checks: run in order on the module's first forward pass (``ForwardCheck``); empty when nothing needs
            proving.
    """

    rule: NormRule
    normalization: bool = False
    checks: tuple[ForwardCheck, ...] = ()


@dataclass(frozen=True)
class _Registered:
    rule: NormRule
    normalization: bool
    check: ForwardCheck | None
    reference: Reference | None
    layer_type: type[nn.Module]


@dataclass(frozen=True)
class Recognized:
    """A family of layer classes known by their structure, with its rule and the check of its first call.

    Attributes:
        matches: whether a module belongs to the family (structure only: names, parameters, attributes).
        rule: its norm rule.
        check: run once per module on its first forward pass with ``(module, inputs, output)``.
        normalization: whether the family counts as normalisation layers (``scope="norm"``).
    """

    matches: Callable[[nn.Module], bool]
    rule: NormRule
    check: ForwardCheck
    normalization: bool = False


_RULES: dict[type[nn.Module], _Registered] = {}
_RECOGNIZED: list[Recognized] = []

R = TypeVar("R", bound=NormRule)


def register_norm_rule(
    *layer_types: type[nn.Module],
    normalization: bool = False,
    check: ForwardCheck | None = None,
    reference: Reference | None = None,
) -> Callable[[R], R]:
    """Register ``rule`` as the per-example squared-norm rule of ``layer_types``.

    Args:
        *layer_types: module classes the rule applies to.  A subclass inherits the rule as long as it keeps the
            registered class's ``forward``; one that overrides ``forward`` gets it only through ``reference``.
        normalization: mark the layers as normalisation layers (LayerNorm, RMSNorm, ...), the ones measured by
            ``GNSMonitor(scope="norm")`` (Gray et al. 2024: LayerNorm-only norms track the total noise scale).
        check: ``(module, inputs, output)``, run on every module's first forward pass: raise
            ``noisescale.UnsupportedLayerError`` for a call the rule cannot measure.
        reference: ``(module, inputs) -> (expected output, size of its terms)``: what the registered class's own
            ``forward`` computes, held against the first output of a subclass that overrides ``forward``.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Raises:
        TypeError: if a layer type is not an ``nn.Module`` subclass.
    """
    for t in layer_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(
                f"register_norm_rule expects nn.Module subclasses, got {t!r}; "
                "pass the layer class itself, e.g. @register_norm_rule(nn.Linear)"
            )
    if check is not None and not callable(check):
        raise TypeError(f"check must be a function (module, inputs, output) -> None, got {type(check).__name__}")
    if reference is not None and not callable(reference):
        raise TypeError(f"reference must be a function (module, inputs) -> (output, scale), got {reference!r}")

    def decorator(rule: R) -> R:
        for t in layer_types:
            _RULES[t] = _Registered(rule, normalization, check, reference, t)
        return rule

    return decorator


def recognize_layers(family: Recognized) -> None:
    """Add a family of layers known by structure; consulted after the registered classes, in order added."""
    _RECOGNIZED.append(family)


def find_layer_rule(module: nn.Module) -> LayerRule | None:
    """How ``module`` is measured, or ``None`` when no rule applies.

    The closest registered class in the method resolution order wins; a subclass that overrides that class's
    ``forward`` keeps the rule only if the class has a ``reference`` (held against its first output).  Otherwise
    the first recognised family that matches, with its check.
    """
    for t in type(module).__mro__:
        found = _RULES.get(t)
        if found is None:
            continue
        checks: tuple[ForwardCheck, ...] = () if found.check is None else (found.check,)
        if type(module).forward is not t.forward:  # type: ignore[attr-defined]
            if found.reference is None:
                return None  # a forward of its own, and nothing to prove the rule still fits it
            checks = (_same_output(found.reference, t), *checks)
        return LayerRule(found.rule, found.normalization, checks)
    family = next((f for f in _RECOGNIZED if f.matches(module)), None)
    return None if family is None else LayerRule(family.rule, family.normalization, (family.check,))


def overrides_forward(module: nn.Module) -> type[nn.Module] | None:
    """The registered class whose ``forward`` ``module``'s class overrides, if it does."""
    for t in type(module).__mro__:
        if t in _RULES:
            return t if type(module).forward is not t.forward else None
    return None


def _same_output(reference: Reference, base: type[nn.Module]) -> ForwardCheck:
    """A check that the first output of a subclass equals what ``base``'s own forward computes."""

    def check(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
        from noisescale.collectors.rules.common import rounding_tolerance
        from noisescale.errors import UnsupportedLayerError

        worst = float("nan")
        try:
            with torch.no_grad():
                expected, scale = reference(module, inputs)
                if expected.shape == output.shape:
                    worst = float((output.to(expected.dtype) - expected).abs().max())
                    if worst <= rounding_tolerance(output.dtype, scale):
                        return None
        except (IndexError, TypeError, ValueError, RuntimeError):
            pass  # inputs the base class's forward would not take: not the same computation
        how = (
            f"largest difference {worst:.3g}"
            if worst == worst
            else f"its first input is not one {base.__name__}'s forward takes"
        )
        raise UnsupportedLayerError(
            f"{type(module).__name__} subclasses {base.__module__}.{base.__qualname__} but overrides forward, and "
            f"its output is not what {base.__name__}'s rule assumes from its first input ({how}): register a rule "
            f"of its own with @noisescale.register_norm_rule({type(module).__name__})"
        )

    return check


def find_norm_rule(module: nn.Module) -> NormRule | None:
    """The rule for ``module`` (see ``find_layer_rule``), or ``None``."""
    found = find_layer_rule(module)
    return None if found is None else found.rule


def forward_check(module: nn.Module) -> ForwardCheck | None:
    """The first of the checks to run on ``module``'s first forward pass, if its rule has any."""
    found = find_layer_rule(module)
    return None if found is None or not found.checks else found.checks[0]


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: registered as one (``register_norm_rule``) or recognised."""
    found = find_layer_rule(module)
    return found is not None and found.normalization


def registered_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer classes that currently have a rule, in registration order."""
    return tuple(_RULES)


# -- layers whose parameters are used inside a function -----------------------------------------------------------

Emit = Callable[[str, torch.Tensor], None]
"""``(parameter name relative to the layer, per-example squared norms (B,))``."""


class LayerHooks(Protocol):
    """The hooks of one layer measured from the inside (``register_layer_hooks``).

    Constructed as ``hooks(module, names, emit, count_examples)``: ``names`` are the parameters to measure, named
    from the layer (submodules' included, e.g. ``out_proj.weight``); ``emit(name, sq)`` receives each parameter's
    per-example squared norms once per forward call during the backward pass; ``count_examples(n)`` once per call.
    Hooks that have a ``context`` attribute (a callable returning a context manager) get the collector's: they
    compute their norms inside ``with self.context():``, so the collector's sketch and Gram cache apply to them
    as to the rule layers.
    """

    def install(self) -> list[RemovableHandle]:
        """Register the hooks on the layer; returns their handles."""
        ...


@dataclass(frozen=True)
class _HookForm:
    hooks: Callable[[nn.Module, list[str], Emit, Callable[[int], None]], LayerHooks]
    params: Callable[[nn.Module], list[str]]
    refuse: Callable[[nn.Module], str | None]


_HOOKS: dict[type[nn.Module], _HookForm] = {}


def register_layer_hooks(
    *layer_types: type[nn.Module],
    hooks: Callable[[nn.Module, list[str], Emit, Callable[[int], None]], LayerHooks],
    params: Callable[[nn.Module], list[str]],
    refuse: Callable[[nn.Module], str | None] = lambda module: None,
) -> None:
    """Measure ``layer_types`` with hooks of their own instead of a per-module rule.

    For layers whose parameters are used inside a function (``nn.MultiheadAttention`` hands its projections,
    ``out_proj``'s included, to ``F.multi_head_attention_forward``), so that no module hook sees their inputs.

    Args:
        *layer_types: the layer classes (subclasses included); a norm rule registered for a class wins.
        hooks: ``(module, names, emit, count_examples) -> LayerHooks``.
        params: the trainable parameters the hooks measure, named from the layer; submodules that own some of
            them are measured through the layer only.
        refuse: why a module cannot be measured (``None`` when it can), e.g. an option the hooks do not support.
    """
    for t in layer_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_layer_hooks expects nn.Module subclasses, got {t!r}")
        _HOOKS[t] = _HookForm(hooks, params, refuse)


def find_layer_hooks(module: nn.Module) -> _HookForm | None:
    """The hook form for ``module``, unless a norm rule covers it."""
    if find_layer_rule(module) is not None:
        return None
    for t in type(module).__mro__:
        if t in _HOOKS:
            return _HOOKS[t]
    return None


# -- weights shared by two layers -------------------------------------------------------------------------------


class TiedWeights(Protocol):
    """The cross term of a weight used by two layers (``register_tied_weights``).

    The per-example gradient of a shared weight is the sum of the two layers' parts ``A_i + H_i``, so its squared
    norm is ``|A_i|^2 + |H_i|^2 + 2 <A_i, H_i>``: the layers' rules give the first two, this gives the third.
    """

    modules: tuple[nn.Module, nn.Module]
    weight: str  # the shared parameter's name in both modules

    def forward(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        """One of the two modules ran forward with ``inputs``."""
        ...

    def backward(self, module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> torch.Tensor | None:
        """One module's output gradient arrived; ``2 <A_i, H_i>`` of shape ``(B,)`` once both have."""
        ...

    def reset(self) -> None:
        """Forget the current step."""
        ...


TiedForm = Callable[[Sequence[nn.Module]], "TiedWeights | None"]
"""``(the modules sharing one weight) -> its cross term``, or ``None`` when the form does not apply."""

_TIES: list[TiedForm] = []


def register_tied_weights(form: TiedForm) -> TiedForm:
    """Add a form of weight sharing the collector can measure exactly (consulted in order added)."""
    _TIES.append(form)
    return form


def tied_weight_forms() -> tuple[TiedForm, ...]:
    """The registered forms of weight sharing."""
    return tuple(_TIES)
