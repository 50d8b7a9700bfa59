"""Errors of the run store (candidates to move into ``noisescale.errors``)."""

from __future__ import annotations

from noisescale.errors import NoiseScaleError

__all__ = ["StoreError"]


class StoreError(NoiseScaleError):
    """A run file cannot be read or written: missing, not a noisescale run, damaged, or from a newer version."""
