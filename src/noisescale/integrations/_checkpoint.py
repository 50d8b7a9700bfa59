"""What an integration keeps in a framework's checkpoint: the monitor's state, its stateful sinks' and a controller's.

The monitor's state (its step count, examples, and the moving averages behind B_simple) is what makes a resumed
run continue exactly where it stopped; an alert engine among the sinks keeps its alerts' states and the history
its rules read.  Lightning and Accelerate save the bundle as it is (``torch.save``); the Hugging Face Trainer
writes callback states into ``trainer_state.json``, so ``to_json`` turns its tensors into nested lists (float64
values survive JSON exactly: Python writes the shortest repr that reads back to the same float).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from noisescale.errors import ConfigError
from noisescale.monitor import GNSMonitor

__all__ = ["BUNDLE_VERSION", "bundle", "from_json", "restore", "to_json"]

BUNDLE_VERSION = 1
_TENSOR = "__tensor__"


def _stateful(sink: object) -> bool:
    return callable(getattr(sink, "state_dict", None)) and callable(getattr(sink, "load_state_dict", None))


def bundle(monitor: GNSMonitor, sinks: Sequence[object], controller: Any = None) -> dict[str, Any]:
    """The monitor's state and each stateful sink's (``None`` for the others), after the sinks caught up.

    Args:
        monitor: the monitor.
        sinks: the sinks given to it, in order.
        controller: a ``BatchSizeController`` the callback drives, whose state is saved too (key ``"controller"``).
    """
    monitor.flush()  # every measurement queued so far has reached the sinks, so their states include it
    extra = {} if controller is None else {"controller": controller.state_dict()}
    return extra | {
        "version": BUNDLE_VERSION,
        "monitor": monitor.state_dict(),
        "sinks": [
            {"type": type(s).__name__, "state": s.state_dict()} if _stateful(s) else None  # type: ignore[attr-defined]
            for s in sinks
        ],
    }


def restore(monitor: GNSMonitor, sinks: Sequence[object], state: dict[str, Any], controller: Any = None) -> None:
    """Load ``bundle()`` into a monitor, its sinks (matched by position and type) and a controller.

    Raises:
        ConfigError: an unknown bundle version, sinks that do not match those the state was saved with, or a
            controller and a state saved without one.
    """
    if not isinstance(state, dict) or state.get("version") != BUNDLE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"unsupported noisescale checkpoint state version {found!r}; expected {BUNDLE_VERSION}")
    if controller is not None and state.get("controller") is None:
        raise ConfigError(
            "the checkpoint was saved without a batch-size controller, and this callback drives one: resume without "
            "controller=, or from a checkpoint saved with it"
        )
    monitor.load_state_dict(state["monitor"])
    # What the monitor still has queued would reach the sinks after their states are loaded, and add to them.
    monitor.flush()
    saved = list(state.get("sinks") or [])
    for i, sink in enumerate(sinks):
        entry = saved[i] if i < len(saved) else None
        if not _stateful(sink):
            continue
        if entry is None or entry.get("type") != type(sink).__name__:
            raise ConfigError(
                f"the checkpoint has no state for sink {i} ({type(sink).__name__}): it was saved with sinks "
                f"{[None if e is None else e.get('type') for e in saved]}; pass the same sinks, in the same order"
            )
        sink.load_state_dict(entry["state"])  # type: ignore[attr-defined]
    if controller is not None:
        controller.load_state_dict(state["controller"])


def to_json(value: Any) -> Any:
    """``value`` with every tensor as ``{"__tensor__": nested list, "dtype": name}``, ready for ``json.dumps``.

    Raises:
        ConfigError: a value JSON cannot hold (it names the path to it).
    """
    return _to_json(value, "state")


def _to_json(value: Any, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {_TENSOR: t.tolist(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"cannot write {path} to JSON: key {k!r} is not a string")
            out[k] = _to_json(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # NaN and infinities too: Python's json writes and reads them back
    raise ConfigError(f"cannot write {path} to JSON: {type(value).__name__} {value!r}")


def from_json(value: Any) -> Any:
    """The inverse of ``to_json``: nested lists marked as tensors become tensors again, with their dtype."""
    if isinstance(value, dict):
        if _TENSOR in value:
            dtype = getattr(torch, value["dtype"])
            return torch.tensor(value[_TENSOR], dtype=dtype).reshape(value["shape"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
