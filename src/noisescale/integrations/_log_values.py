"""The numbers a callback adds to a framework's own logs, under the tags every noisescale sink uses.

Reading a measurement's numbers waits for the device once, so callbacks call this only on the steps the framework
itself logs (where it reads its own loss from the device anyway), never on every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from noisescale.errors import ConfigError
from noisescale.sinks.tags import whole_tag
from noisescale.types import COLUMNS, Measurement

__all__ = ["DEFAULT_COLUMNS", "check_columns", "log_values"]

DEFAULT_COLUMNS = ("b_simple", "b_simple_low", "b_simple_high", "b_simple_raw")
"""B_simple, its band and this step's value alone; ``noisescale/batch_size`` is always added."""


def check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """``columns`` as a tuple, each one a measurement column.

    Raises:
        ConfigError: an unknown column.
    """
    if isinstance(columns, str):
        columns = (columns,)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ConfigError(f"log_columns must be measurement columns {list(COLUMNS)}, got {unknown}")
    return tuple(columns)


def log_values(m: Measurement, columns: Sequence[str]) -> dict[str, float]:
    """``{"noisescale/b_simple": ..., "noisescale/band/low": ..., "noisescale/batch_size": B}``.

    With ``precondition=`` the monitor's ``b_precond`` and its band and raw value come too (``noisescale/b_precond``).

    Undefined values (``None``: too few small batches, a skipped step) are left out, never written as 0.
    """
    out = {whole_tag(c): v for c in columns if (v := getattr(m, c)) is not None}
    # Adam's preconditioned noise scale, when the monitor measures it (precondition=)
    out.update({whole_tag(k): v for k, v in m.companion_metrics().items() if v is not None})
    out[whole_tag("batch_size")] = float(m.batch_size)
    return out
