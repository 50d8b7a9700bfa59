"""noisescale: the gradient noise scale as a first-class training signal for PyTorch.

``import noisescale`` loads only torch and the standard library.
"""

from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.errors import (
    ConfigError,
    GroupsError,
    NoiseScaleError,
    SharedParameterError,
    StepError,
    UnsupportedLayerError,
)
from noisescale.estimators.two_batch import TwoBatchEstimate, two_batch_estimate
from noisescale.monitor import GNSMonitor
from noisescale.types import LayerMeasurement, Measurement
from noisescale.version import __version__

# The run store is exported lazily: importing it costs sqlite3 and threads that a bare monitor does not need.
_LAZY = {
    "Run": "noisescale.store",
    "open_run": "noisescale.store",
    "list_runs": "noisescale.store",
    "StoreError": "noisescale.store",
}
# Subpackages reachable as ns.alerts and ns.sinks, imported on first use.
_SUBPACKAGES = ("alerts", "sinks")


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f"noisescale.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'noisescale' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ConfigError",
    "GNSMonitor",
    "GroupsError",
    "LayerMeasurement",
    "Measurement",
    "NoiseScaleError",
    "Run",
    "SharedParameterError",
    "StepError",
    "StoreError",
    "TwoBatchEstimate",
    "UnsupportedLayerError",
    "__version__",
    "alerts",
    "list_runs",
    "open_run",
    "register_norm_rule",
    "sinks",
    "two_batch_estimate",
]
