"""noisescale: the gradient noise scale as a first-class training signal for PyTorch.

``import noisescale`` loads only torch and the standard library, and torch itself only when a name that needs it
is first used (``ns.GNSMonitor``, ...): the ``noisescale`` command reads runs without paying for torch.
"""

from typing import TYPE_CHECKING

from noisescale.errors import ConfigError, NoiseScaleError, SharedParameterError, StepError, UnsupportedLayerError
from noisescale.version import __version__

if TYPE_CHECKING:
    from noisescale import alerts, sinks
    from noisescale.collectors.rules.registry import register_norm_rule
    from noisescale.estimators.two_batch import TwoBatchEstimate, two_batch_estimate
    from noisescale.monitor import GNSMonitor
    from noisescale.planning import plan
    from noisescale.store import Run, StoreError, list_runs, open_run
    from noisescale.types import LayerMeasurement, Measurement

# Exported lazily, each from its module on first use: the core names import torch, and the run store costs
# sqlite3 and threads that a bare monitor does not need.  A new top-level name goes here, not in an import above,
# or every `noisescale` command pays for torch again (tests/unit/test_cli_startup.py).
_LAZY = {
    "GNSMonitor": "noisescale.monitor",
    "LayerMeasurement": "noisescale.types",
    "Measurement": "noisescale.types",
    "TwoBatchEstimate": "noisescale.estimators.two_batch",
    "two_batch_estimate": "noisescale.estimators.two_batch",
    "register_norm_rule": "noisescale.collectors.rules.registry",
    "plan": "noisescale.planning",
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
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


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
    "alerts",
    "list_runs",
    "open_run",
    "plan",
    "register_norm_rule",
    "sinks",
    "two_batch_estimate",
]
