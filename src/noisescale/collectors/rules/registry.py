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

Layers of other libraries that cannot be imported here (Hugging Face's ``LlamaRMSNorm`` and its kin) are
*recognised* by their structure instead (``recognize_layers``).  A recognised layer's rule is checked once, on
the layer's first forward pass, against what the layer really computed (``Recognized.check``), so a look-alike
with other maths is refused, not measured wrongly; the check reads one number back from the device, once per
layer.  A class registered with ``register_norm_rule`` always wins (and skips the check).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import nn

__all__ = [
    "ForwardCheck",
    "NormRule",
    "Recognized",
    "find_norm_rule",
    "forward_check",
    "is_norm_layer",
    "recognize_layers",
    "register_norm_rule",
    "registered_layer_types",
]

NormRule = Callable[[nn.Module, tuple[object, ...], torch.Tensor], Mapping[str, torch.Tensor]]
"""``(module, inputs, grad_output) -> {param_name: per-example squared norms of shape (B,)}``."""

ForwardCheck = Callable[[nn.Module, tuple[object, ...], torch.Tensor], None]
"""``(module, inputs, output) -> None``; raises ``UnsupportedLayerError`` when the rule does not fit the layer."""

_RULES: dict[type[nn.Module], NormRule] = {}
_NORM_LAYERS: set[type[nn.Module]] = set()


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


_RECOGNIZED: list[Recognized] = []

R = TypeVar("R", bound=NormRule)


def register_norm_rule(*layer_types: type[nn.Module], normalization: bool = False) -> Callable[[R], R]:
    """Register ``rule`` as the per-example squared-norm rule of ``layer_types``.

    Args:
        *layer_types: module classes the rule applies to (subclasses inherit it unless they have their own).
        normalization: mark the layers as normalisation layers (LayerNorm, RMSNorm, ...), the ones measured by
            ``GNSMonitor(scope="norm")`` (Gray et al. 2024: LayerNorm-only norms track the total noise scale).

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

    def decorator(rule: R) -> R:
        for t in layer_types:
            _RULES[t] = rule
            if normalization:
                _NORM_LAYERS.add(t)
            else:
                _NORM_LAYERS.discard(t)
        return rule

    return decorator


def recognize_layers(family: Recognized) -> None:
    """Add a family of layers known by structure; consulted after the registered classes, in order added."""
    _RECOGNIZED.append(family)


class _Found(NamedTuple):
    rule: NormRule
    normalization: bool
    check: ForwardCheck | None  # only for a recognised layer


def _lookup(module: nn.Module) -> _Found | None:
    """The registered class's rule (method resolution order), else the first recognised family's; or ``None``."""
    for t in type(module).__mro__:
        if t in _RULES:
            return _Found(_RULES[t], t in _NORM_LAYERS, None)
    family = next((f for f in _RECOGNIZED if f.matches(module)), None)
    return None if family is None else _Found(family.rule, family.normalization, family.check)


def find_norm_rule(module: nn.Module) -> NormRule | None:
    """The rule for ``module``: its class's (method resolution order), else a recognised family's; or ``None``."""
    found = _lookup(module)
    return None if found is None else found.rule


def forward_check(module: nn.Module) -> ForwardCheck | None:
    """The check to run on ``module``'s first forward pass: only recognised (not registered) layers have one."""
    found = _lookup(module)
    return None if found is None else found.check


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: registered as one (``register_norm_rule``) or recognised."""
    found = _lookup(module)
    return found is not None and found.normalization


def registered_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer classes that currently have a rule, in registration order."""
    return tuple(_RULES)
