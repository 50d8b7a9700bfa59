"""Values an optimizer's next step will use that its parameter groups do not hold until that step runs.

``BatchSizeController(keep_horizons=...)`` changes Adam's ``betas`` and the weight decay only for the length of each
``optimizer.step()`` (``controllers.apply``), so the groups hold the user's values whenever anything else reads
them.  Adam's preconditioned noise scale (``noisescale.preconditioner``) needs the ``beta2`` of the step about to be
taken when the backward pass ends, before that step: the controller declares here how it will change each group,
and the preconditioner asks.  A registry in the innermost layer keeps the two apart: neither imports the other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["UNKNOWN", "declare", "next_step_values", "withdraw"]

UNKNOWN = object()
"""A value the next step will change in a way not known before it runs (it depends on a later decision)."""

NextValues = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""A parameter group -> the values its next step will use instead (``{"betas": (b1, b2)}``, ...)."""

_DECLARED: weakref.WeakKeyDictionary[Any, NextValues] = weakref.WeakKeyDictionary()


def declare(optimizer: Any, values: NextValues) -> None:
    """From now on ``optimizer``'s next steps use ``values(group)`` in place of the group's own entries."""
    _DECLARED[optimizer] = values


def withdraw(optimizer: Any, values: NextValues) -> None:
    """Undo ``declare`` (only if ``values`` is still the one declared)."""
    if _DECLARED.get(optimizer) == values:  # a bound method: equal, not identical, each time it is read
        del _DECLARED[optimizer]


def next_step_values(optimizer: Any, group: Mapping[str, Any]) -> Mapping[str, Any]:
    """The entries of ``group`` that ``optimizer``'s next step will replace, and by what (``UNKNOWN`` if not known
    yet); empty when nothing is declared."""
    values = _DECLARED.get(optimizer)
    return {} if values is None else values(group)
