"""Plan batch schedules from a recorded run: McCandlish et al. (2018)'s steps/examples trade-off, stretch by stretch.

``noisescale.plan(run)`` reads a run's B_simple (with its band) and training loss over the examples seen, recovers
how many steps (``dS_min``) and examples (``dE_min``) each stretch of training needed at least, and predicts the
steps, examples and time of other schedules to reach the same loss: fixed batches, a linear ramp, ``k x B_simple``,
``devices x micro-batch``.  ``noisescale plan RUN`` prints it.  The arithmetic (``model``, ``schedules``,
``step_time``) is pure; ``planner`` does the reading.
"""

from noisescale.planning.model import Outcome, Piece, predict, recover
from noisescale.planning.planner import Analysis, analyse, default_schedules, plan, price
from noisescale.planning.result import ASSUMPTIONS, Plan, PlanError, PlanWarning, Prediction
from noisescale.planning.schedules import Devices, Fixed, FollowNoise, LinearRamp, Replay, Schedule
from noisescale.planning.step_time import StepTime
from noisescale.planning.stretches import Stretch

__all__ = [
    "ASSUMPTIONS",
    "Analysis",
    "Devices",
    "Fixed",
    "FollowNoise",
    "LinearRamp",
    "Outcome",
    "Piece",
    "Plan",
    "PlanError",
    "PlanWarning",
    "Prediction",
    "Replay",
    "Schedule",
    "StepTime",
    "Stretch",
    "analyse",
    "default_schedules",
    "plan",
    "predict",
    "price",
    "recover",
]
