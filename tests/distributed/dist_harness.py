"""Run a function on 2 CPU processes with gloo: spawned with ``torch.multiprocessing``, a free port, a deadline.

The spawned processes import this module (and the scenario module) by name, from the ``sys.path`` the parent
hands them, so this directory is put on it first.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2


def free_port() -> int:
    """A port nobody listens on now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[[int, int], Any], out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two shared cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[[int, int], Any], *, world: int = WORLD, timeout: float = 100.0) -> list[Any]:
    """Run ``fn(rank, world)`` in ``world`` spawned processes; return each rank's result, in rank order.

    ``fn`` must be a module-level function (it is pickled by name).  A process that raises fails the call with
    its traceback; processes still running at the deadline are killed.
    """
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        return _run_once(fn, world, timeout)
    except (mp.ProcessRaisedException, mp.ProcessExitedException, TimeoutError) as e:
        # Rendezvous on a shared machine can fail for reasons outside the code under test (the probed free port
        # taken meanwhile, a connection reset while the other process is still starting): run once more, on a
        # new port.  A real failure fails again.
        warnings.warn(f"distributed run of {fn.__name__} failed once, retrying: {str(e)[-300:]}", stacklevel=2)
        return _run_once(fn, world, timeout)


def _run_once(fn: Callable[[int, int], Any], world: int, timeout: float) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world, free_port(), fn, out_dir), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"distributed run of {fn.__name__} did not finish within {timeout:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
