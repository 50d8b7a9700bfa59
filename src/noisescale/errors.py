"""The one small hierarchy of errors noisescale raises.

Every message says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "FALLBACK_HINT",
    "ConfigError",
    "GroupsError",
    "NoiseScaleError",
    "SharedParameterError",
    "StepError",
    "UnsupportedLayerError",
]


FALLBACK_HINT = "source='microbatch' (one norm per micro-batch under gradient accumulation)"
"""Where to turn when per-example or per-rank statistics are refused: named here, once, for every message."""


class NoiseScaleError(Exception):
    """Base class of every error raised by noisescale."""


class ConfigError(NoiseScaleError, ValueError):
    """An argument given at construction is out of range or of the wrong kind."""


class UnsupportedLayerError(NoiseScaleError, TypeError):
    """A layer holds trainable parameters but no per-example norm rule is registered for it."""


class SharedParameterError(NoiseScaleError, ValueError):
    """A parameter is used by several layers (tied weights), so per-layer norms cannot simply be added."""


class StepError(NoiseScaleError, RuntimeError):
    """``GNSMonitor.step()`` was called in a state that cannot give a measurement (no backward, wrong size)."""


class GroupsError(StepError):
    """``step(groups=..., example_ids=...)`` got ids it cannot use, or a monitor that cannot use them.

    The step itself was measured, recorded and sent to every sink before this was raised: ``measurement`` holds
    it, so a loop that catches the error loses nothing.
    """

    def __init__(self, message: str, measurement: object = None) -> None:
        super().__init__(message)
        self.measurement = measurement
