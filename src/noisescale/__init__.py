"""noisescale: the gradient noise scale as a first-class training signal for PyTorch.

``import noisescale`` loads only torch and the standard library.
"""

from noisescale.collectors.rules.registry import register_norm_rule
from noisescale.errors import ConfigError, NoiseScaleError, SharedParameterError, StepError, UnsupportedLayerError
from noisescale.estimators.two_batch import TwoBatchEstimate, two_batch_estimate
from noisescale.monitor import GNSMonitor
from noisescale.types import LayerMeasurement, Measurement

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GNSMonitor",
    "LayerMeasurement",
    "Measurement",
    "NoiseScaleError",
    "SharedParameterError",
    "StepError",
    "TwoBatchEstimate",
    "UnsupportedLayerError",
    "__version__",
    "register_norm_rule",
    "two_batch_estimate",
]
