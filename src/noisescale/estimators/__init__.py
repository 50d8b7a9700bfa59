"""Pure estimators over tensors: the two-batch estimator, separate smoothing, the uncertainty band."""

from noisescale.estimators.band import fieller_band, z_for
from noisescale.estimators.smoothing import EMAState, SmoothedMoments, decay_for, ema_init, ema_moments, ema_update
from noisescale.estimators.two_batch import TwoBatchEstimate, two_batch_estimate, two_batch_from_sums

__all__ = [
    "EMAState",
    "SmoothedMoments",
    "TwoBatchEstimate",
    "decay_for",
    "ema_init",
    "ema_moments",
    "ema_update",
    "fieller_band",
    "two_batch_estimate",
    "two_batch_from_sums",
    "z_for",
]
