"""noisescale: the gradient noise scale as a first-class training signal for PyTorch.

``import noisescale`` loads only torch and the standard library.
"""

from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.controllers import AdaptiveBatchSampler, BatchSizeController, ExampleClock
from noisescale.errors import ConfigError, NoiseScaleError, SharedParameterError, StepError, UnsupportedLayerError
from noisescale.estimators.two_batch import TwoBatchEstimate, two_batch_estimate
from noisescale.monitor import GNSMonitor
from noisescale.types import LayerMeasurement, Measurement

__version__ = "0.1.0"

# The run store is exported lazily: importing it costs sqlite3 and threads that a bare monitor does not need.
_LAZY = {
    "Run": "noisescale.store",
    "open_run": "noisescale.store",
    "list_runs": "noisescale.store",
    "StoreError": "noisescale.store",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'noisescale' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AdaptiveBatchSampler",
    "BatchSizeController",
    "ConfigError",
    "ExampleClock",
    "GNSMonitor",
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
    "list_runs",
    "open_run",
    "register_norm_rule",
    "two_batch_estimate",
]
