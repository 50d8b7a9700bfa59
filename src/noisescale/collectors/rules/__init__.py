"""Built-in per-example norm rules; importing this package registers them."""

from noisescale.collectors.rules import conv, embedding, group_norm, linear, norm, transposed_linear  # noqa: F401
from noisescale.collectors.rules.norm import rms_norm_rule
from noisescale.collectors.rules.registry import (
    NormRule,
    find_norm_rule,
    is_norm_layer,
    register_norm_rule,
    registered_layer_types,
)

__all__ = [
    "NormRule",
    "find_norm_rule",
    "is_norm_layer",
    "register_norm_rule",
    "registered_layer_types",
    "rms_norm_rule",
]
