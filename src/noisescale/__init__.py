"""noisescale: the gradient noise scale as a first-class training signal for PyTorch.

``import noisescale`` loads only torch and the standard library, and torch itself only when a name that needs it
is first used (``ns.GNSMonitor``, ...): the ``noisescale`` command reads runs without paying for torch.
"""

from typing import TYPE_CHECKING

from noisescale.errors import ConfigError, NoiseScaleError, SharedParameterError, StepError, UnsupportedLayerError

if TYPE_CHECKING:
    from noisescale.collectors.rules.registry import register_norm_rule
    from noisescale.estimators.two_batch import TwoBatchEstimate, two_batch_estimate
    from noisescale.monitor import GNSMonitor
    from noisescale.store import Run, StoreError, list_runs, open_run
    from noisescale.types import LayerMeasurement, Measurement

__version__ = "0.1.0"

# Exported lazily, each from its module on first use: the core names import torch, and the run store costs
# sqlite3 and threads that a bare monitor does not need.
_LAZY = {
    "GNSMonitor": "noisescale.monitor",
    "LayerMeasurement": "noisescale.types",
    "Measurement": "noisescale.types",
    "TwoBatchEstimate": "noisescale.estimators.two_batch",
    "two_batch_estimate": "noisescale.estimators.two_batch",
    "register_norm_rule": "noisescale.collectors.rules.registry",
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

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConfigError",
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
