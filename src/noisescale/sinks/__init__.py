"""Logging sinks: send what the monitor measures (and your metrics and its events) to other tools.

Each is two lines, and each needs its tool only when it is created (``pip install 'noisescale[tensorboard]'``,
``[wandb]``, ``[mlflow]``; CSV needs nothing)::

    tb = ns.sinks.TensorBoard("tb/")
    monitor = ns.GNSMonitor(model, sinks=[run, tb, ns.alerts.default_rules()])

Importing this package imports none of those tools.  See docs/sinks.md.
"""

from noisescale.sinks.csv_files import CSV
from noisescale.sinks.mlflow_tracking import MLflow
from noisescale.sinks.scalars import ScalarSink
from noisescale.sinks.tensorboard import TensorBoard
from noisescale.sinks.weights_biases import WandB

__all__ = ["CSV", "MLflow", "ScalarSink", "TensorBoard", "WandB"]
