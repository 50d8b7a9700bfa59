"""Batch-size and learning-rate control from the noise scale.

Pure decisions, optax-style (``ControllerConfig.init() -> state``, ``ControllerConfig.update(m, state) ->
(decision, state)``, frozen versioned states), and the one place that applies them (``apply.py``): an optimizer's
learning rate for the length of each step, ``AdaptiveBatchSampler.batch_size``, accumulation steps and an
``ExampleClock``.  ``BatchSizeController`` holds the state for a training loop.
"""

from noisescale.controllers.clock import ExampleClock
from noisescale.controllers.config import POLICIES, ControllerConfig, Stall
from noisescale.controllers.controller import BatchSizeController
from noisescale.controllers.grid import Grid
from noisescale.controllers.rules import LR_RULES, horizon_beta, lr_scale, weight_decay_for
from noisescale.controllers.sampler import AdaptiveBatchSampler
from noisescale.controllers.state import STATE_VERSION, ControllerState, Decision

__all__ = [
    "LR_RULES",
    "POLICIES",
    "STATE_VERSION",
    "AdaptiveBatchSampler",
    "BatchSizeController",
    "ControllerConfig",
    "ControllerState",
    "Decision",
    "ExampleClock",
    "Grid",
    "Stall",
    "horizon_beta",
    "lr_scale",
    "weight_decay_for",
]
