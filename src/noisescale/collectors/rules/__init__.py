"""Built-in per-example norm rules; importing this package registers them."""

from noisescale.collectors.rules import linear  # noqa: F401  (registers nn.Linear)
from noisescale.collectors.rules.registry import (
    NormRule,
    find_norm_rule,
    is_norm_layer,
    register_norm_rule,
    registered_layer_types,
)

__all__ = ["NormRule", "find_norm_rule", "is_norm_layer", "register_norm_rule", "registered_layer_types"]
