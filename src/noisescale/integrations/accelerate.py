"""``AccelerateMonitor``: ``GNSMonitor`` in a training loop of your own under Hugging Face ``accelerate``.

Accelerate leaves the loop to you, so the monitor works there as it is; this helper does the bookkeeping such a
loop needs: it counts the examples of each micro-batch, measures once per optimizer step (when
``accelerator.sync_gradients`` says the step's last micro-batch has been through backward), counts every
process's examples, passes the accelerator's ``GradScaler``, and saves its state with ``accelerator.save_state``::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    gns = AccelerateMonitor(accelerator, model, sinks=[run])   # after prepare: the model as it is trained
    accelerator.register_for_checkpointing(gns)                # optional: save_state / load_state keep it
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            m = gns.after_backward(len(x))                     # a Measurement on a step's last micro-batch
            optimizer.step()
            optimizer.zero_grad()

Under several processes the prepared model is DDP's wrapper, so ``source="auto"`` measures each process's local
gradient (``rank``), and every process gets the same numbers.  Accelerate gives every process batches of one size
(``even_batches=True``, its default), so the step's examples are this process's times the number of processes;
the monitor checks that on the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from noisescale.errors import ConfigError
from noisescale.integrations._checkpoint import bundle, restore
from noisescale.integrations._options import MonitorOptions
from noisescale.integrations._versions import Supported, require
from noisescale.monitor import GNSMonitor
from noisescale.sink import Sink
from noisescale.source_choice import Source
from noisescale.types import Measurement

__all__ = ["SUPPORTED", "AccelerateMonitor"]

SUPPORTED = Supported(
    distribution="accelerate",
    minimum=(1, 0),
    below=(2,),
    extra="accelerate",
    what="noisescale.integrations.accelerate.AccelerateMonitor",
)

_accelerate = require("accelerate", SUPPORTED)


class AccelerateMonitor:
    """Measures B_simple once per optimizer step of a loop under ``accelerator.accumulate``.

    Args:
        accelerator: the ``accelerate.Accelerator`` running the loop.
        model: the model returned by ``accelerator.prepare`` (wrapped in DDP under several processes).
        source: the monitor's source: ``"auto"`` picks ``rank`` under several processes, ``microbatch`` with
            ``gradient_accumulation_steps >= 2``, else ``example``.
        sinks, callbacks, run, per_layer, halflife, confidence, on_unsupported, scope, loss_couples_examples: as
            for ``GNSMonitor``.
        precondition: the optimizer (as ``accelerator.prepare`` returned it, or the one you built) to also
            measure Adam's preconditioned noise scale, ``m.b_precond`` (``GNSMonitor(precondition=)``).

    Raises:
        FrameworkVersionError: the installed accelerate lies outside the supported range.
        ConfigError: a bad option, or an ``accelerator`` that is not an ``accelerate.Accelerator``.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        source: Source = "auto",
        *,
        sinks: Sequence[Sink] = (),
        callbacks: Sequence[Callable[[Measurement], object]] = (),
        run: Any = None,
        per_layer: bool = True,
        halflife: float | None = None,
        confidence: float = 0.9,
        on_unsupported: Any = None,
        scope: Any = "all",
        loss_couples_examples: bool = False,
        precondition: Any = None,
    ) -> None:
        SUPPORTED.check(SUPPORTED.installed(_accelerate))
        if not isinstance(accelerator, _accelerate.Accelerator):
            raise ConfigError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
        options = MonitorOptions(
            source=source,
            per_layer=per_layer,
            halflife=halflife,
            confidence=confidence,
            on_unsupported=on_unsupported,
            scope=scope,
            loss_couples_examples=loss_couples_examples,
            sinks=tuple(sinks) if isinstance(sinks, (list, tuple)) else sinks,
            callbacks=tuple(callbacks),
            precondition=precondition is not None,
        )
        self.accelerator = accelerator
        self.sinks = list(options.sinks)
        self.monitor: GNSMonitor = options.build(model, run=run, scaler=accelerator.scaler, optimizer=precondition)
        self._micro: list[int] = []

    def after_backward(self, examples: int) -> Measurement | None:
        """Count a micro-batch of ``examples`` (this process's) whose backward pass just ran; measure the step if it
        was the step's last (``accelerator.sync_gradients``).

        Returns:
            The step's ``Measurement`` after its last micro-batch, ``None`` after the others.

        Raises:
            ConfigError: ``examples`` is not a positive int.
        """
        if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
            raise ConfigError(f"examples must be the micro-batch's example count, a positive int, got {examples!r}")
        self._micro.append(examples)
        if not self.accelerator.sync_gradients:
            return None
        sizes = self._micro if len(set(self._micro)) > 1 else None
        local = sum(self._micro)
        self._micro = []
        return self.monitor.step(local * self.accelerator.num_processes, micro_batch_sizes=sizes)

    def log(self, metrics: Mapping[str, object], *, step: int | None = None) -> None:
        """``GNSMonitor.log``: your numbers (``{"loss": loss}``) to every sink, without waiting."""
        self.monitor.log(metrics, step=step)

    def event(self, kind: str, message: str = "", **kwargs: Any) -> None:
        """``GNSMonitor.event``."""
        self.monitor.event(kind, message, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and its stateful sinks' (``accelerator.register_for_checkpointing`` saves it)."""
        return bundle(self.monitor, self.sinks)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        restore(self.monitor, self.sinks, state)

    def close(self) -> None:
        """Close the monitor (removes its hooks; flushes and closes the sinks)."""
        self.monitor.close()

    def __enter__(self) -> AccelerateMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
