"""Plan batch schedules from a recorded run: McCandlish et al. (2018)'s steps/examples trade-off, stretch by stretch.

The arithmetic (``model``, ``schedules``, ``step_time``) is pure.
"""

from noisescale.plan.model import Outcome, Piece, predict, recover
from noisescale.plan.schedules import Devices, Fixed, FollowNoise, LinearRamp, Replay, Schedule
from noisescale.plan.step_time import StepTime

__all__ = [
    "Devices",
    "Fixed",
    "FollowNoise",
    "LinearRamp",
    "Outcome",
    "Piece",
    "Replay",
    "Schedule",
    "StepTime",
    "predict",
    "recover",
]
