"""``noisescale demo``: small seeded training runs with the monitor on (digits MLP, byte-level transformer)."""

from noisescale.demo.task import DemoError
from noisescale.demo.train import DemoOptions, DemoResult, run_demo

__all__ = ["DemoError", "DemoOptions", "DemoResult", "run_demo"]
