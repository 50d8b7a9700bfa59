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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

__all__ = ["NormRule", "find_norm_rule", "is_norm_layer", "register_norm_rule", "registered_layer_types"]

NormRule = Callable[[nn.Module, tuple[object, ...], torch.Tensor], Mapping[str, torch.Tensor]]
"""``(module, inputs, grad_output) -> {param_name: per-example squared norms of shape (B,)}``."""

_RULES: dict[type[nn.Module], NormRule] = {}
_NORM_LAYERS: set[type[nn.Module]] = set()

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


def find_norm_rule(module: nn.Module) -> NormRule | None:
    """Return the rule for ``module``'s class, looking up its method resolution order; ``None`` if none."""
    for t in type(module).__mro__:
        rule = _RULES.get(t)
        if rule is not None:
            return rule
    return None


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` was registered as a normalisation layer (see ``register_norm_rule``)."""
    return any(t in _NORM_LAYERS for t in type(module).__mro__)


def registered_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer classes that currently have a rule, in registration order."""
    return tuple(_RULES)
