"""Registers every built-in way of measuring a layer: per-module rules, attention's own hooks, tied weights.

Importing this module is what makes them known to the registry (``rules.registry``); a new built-in layer is
added here, never in the collector.
"""

from noisescale.collectors import attention, tied  # noqa: F401  (register_layer_hooks, register_tied_weights)
from noisescale.collectors.rules import conv, embedding, group_norm, linear, norm, transposed_linear  # noqa: F401
