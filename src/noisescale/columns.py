"""The columns of a measurement table, in a module of their own that needs no torch.

The monitor fills them (``noisescale.types`` re-exports ``COLUMNS``); the run store's schema, its readers and
the command line name them too, and must not pay for importing torch to do so.
"""

from __future__ import annotations

__all__ = ["COLUMNS"]

COLUMNS = (
    "b_simple",
    "b_simple_low",
    "b_simple_high",
    "b_simple_raw",
    "grad_sq",
    "trace_cov",
    "grad_sq_raw",
    "trace_cov_raw",
)
"""The columns of a measurement table, in order; one row for the whole model, then one per layer/module."""
