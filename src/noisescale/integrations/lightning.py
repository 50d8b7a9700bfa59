"""``NoiseScaleCallback``: the gradient noise scale of a ``lightning.pytorch`` training run, as one callback.

::

    from noisescale.integrations.lightning import NoiseScaleCallback

    trainer = L.Trainer(callbacks=[NoiseScaleCallback(run="runs", sinks=[ns.alerts.default_rules()])])
    trainer.fit(model, datamodule)

What it measures is what backward produced: the monitor reads ``|p.grad|^2`` when the last backward pass of a step
ends, so Lightning's gradient clipping and a ``GradScaler``'s unscaling, which come before the optimizer step, change
nothing.  Each optimizer step is measured once, in ``on_before_optimizer_step``, with the examples of all its
micro-batches (``accumulate_grad_batches``) on all ranks (``batch_size`` is the global batch).

Under DDP (``strategy="ddp"``, ``"ddp_spawn"``, ...) the monitor is built on the DDP-wrapped model, so
``source="auto"`` measures each rank's local gradient (``rank``) and every rank reports the same numbers.

With ``controller=`` (an ``ns.BatchSizeController`` built with ``micro_batch=`` and ``optimizer="later"``) the
callback also drives the batch: each step's measurement goes to the controller, whose learning-rate multiplier is
applied to that step's ``optimizer.step()``, and its accumulation becomes ``trainer.accumulate_grad_batches`` at the
next safe point.  Lightning counts accumulation from the start of each epoch (a step ends when the epoch's batch
count is a multiple of ``accumulate_grad_batches``, and gradients are zeroed at the same points), so a new
accumulation ``k`` can start only where the batches done in the epoch are a multiple of ``k``, or at an epoch's
start; a decision that falls elsewhere is held (the controller sees a ``"deferred"`` measurement) and made again at
the next step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from noisescale.controllers.controller import BatchSizeController
from noisescale.errors import ConfigError, StepError
from noisescale.integrations._checkpoint import bundle, restore
from noisescale.integrations._driving import Deferred, MonitorRun, check_controller
from noisescale.integrations._examples import BatchSizeFn, count_examples
from noisescale.integrations._log_values import DEFAULT_COLUMNS, check_columns, log_values
from noisescale.integrations._options import MonitorOptions
from noisescale.integrations._versions import Supported, require
from noisescale.monitor import GNSMonitor
from noisescale.sink import Sink
from noisescale.source_choice import Source
from noisescale.store import Run
from noisescale.types import Measurement

__all__ = ["SUPPORTED", "NoiseScaleCallback"]

SUPPORTED = Supported(
    distribution="lightning",
    minimum=(2, 2),
    below=(3,),
    extra="lightning",
    what="noisescale.integrations.lightning.NoiseScaleCallback",
)

_lightning = require("lightning", SUPPORTED)
_pl = require("lightning.pytorch", SUPPORTED)


class NoiseScaleCallback(_pl.Callback):  # type: ignore[name-defined]
    """Measures B_simple at every optimizer step of ``Trainer.fit``, logs it and keeps its state in checkpoints.

    Args:
        source: the monitor's source (``GNSMonitor``): ``"auto"`` picks ``rank`` under DDP, ``microbatch`` with
            ``accumulate_grad_batches >= 2``, else ``example``.
        sinks: where every measurement, metric and event also goes (``ns.alerts.default_rules()`` for alerts,
            ``ns.sinks.TensorBoard(...)``, ...); closed when ``fit`` ends.
        run: a run store: an ``ns.Run`` (left open for you to close), or a folder, where the callback creates a
            run (on global rank 0 only) when ``fit`` starts and closes it when ``fit`` ends.
        run_name: the name of a run the callback creates.
        run_config: the settings recorded with a run the callback creates.
        callbacks: functions called with every ``Measurement``, on the monitor's sink thread.
        batch_size_fn: ``batch -> number of examples``; by default the length of the batch's first tensor.
        log_columns: the measurement columns added to the trainer's logs at its logging cadence
            (``log_every_n_steps``), as ``noisescale/b_simple``, ``noisescale/band/low``, ... (with
            ``noisescale/batch_size``); ``()`` logs nothing to the trainer.
        prog_bar: also show them in the progress bar.
        log_loss: send the step's mean training loss to the monitor's sinks as ``"loss"`` (automatic optimization),
            which the run store records and the ``loss_stalled`` alert reads.
        per_layer, halflife, confidence, on_unsupported, scope, loss_couples_examples: as for ``GNSMonitor``.
        precondition: also measure Adam's preconditioned noise scale with the trainer's optimizer
            (``GNSMonitor(precondition=)``): ``noisescale/b_precond`` in the logs, ``signal="b_precond"`` for the
            controller.
        controller: an ``ns.BatchSizeController`` to drive, built with ``micro_batch=`` (the DataLoader's batch
            size), ``world_size=`` (the trainer's) and ``optimizer="later"``: it sets ``accumulate_grad_batches``
            (at safe points, see the module docstring) and scales the learning rate of every optimizer step; its
            decisions go to the run and sinks, its state into the checkpoint.  No stall response (the callback
            does not see the loss before the optimizer step).

    Raises:
        FrameworkVersionError: the installed lightning lies outside the supported range.
        ConfigError: a bad option (the monitor's own checks, made now).
    """

    def __init__(
        self,
        source: Source = "auto",
        *,
        sinks: Sequence[Sink] = (),
        run: Run | str | os.PathLike[str] | None = None,
        run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callable[[Measurement], object]] = (),
        batch_size_fn: BatchSizeFn | None = None,
        log_columns: Sequence[str] = DEFAULT_COLUMNS,
        prog_bar: bool = False,
        log_loss: bool = True,
        per_layer: bool = True,
        halflife: float | None = None,
        confidence: float = 0.9,
        on_unsupported: Any = None,
        scope: Any = "all",
        loss_couples_examples: bool = False,
        precondition: bool = False,
        controller: BatchSizeController | None = None,
    ) -> None:
        SUPPORTED.check(SUPPORTED.installed(_lightning))
        super().__init__()
        self.options = MonitorOptions(
            source=source,
            per_layer=per_layer,
            halflife=halflife,
            confidence=confidence,
            on_unsupported=on_unsupported,
            scope=scope,
            loss_couples_examples=loss_couples_examples,
            sinks=tuple(sinks) if isinstance(sinks, (list, tuple)) else sinks,
            callbacks=tuple(callbacks),
            precondition=bool(precondition),
        )
        self.options.check()
        if run is not None and not isinstance(run, (str, os.PathLike)) and not callable(getattr(run, "log", None)):
            raise ConfigError(f"run must be an ns.Run or a folder to create one in, got {type(run).__name__}")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ConfigError(f"batch_size_fn must be a function batch -> number of examples, got {batch_size_fn!r}")
        self.run_spec = run
        self.run_name = run_name
        self.run_config = dict(run_config or {})
        self.batch_size_fn = batch_size_fn
        self.log_columns = check_columns(log_columns)
        self.prog_bar = bool(prog_bar)
        self.log_loss = bool(log_loss)
        self.controller = None if controller is None else _check_lightning_controller(controller, source)

        self.monitor: GNSMonitor | None = None
        self.run: Any = run if run is not None and not isinstance(run, (str, os.PathLike)) else None
        self.latest: Measurement | None = None  # the last step's measurement (its numbers are read lazily)
        self._owns_run = False
        self._pending_state: dict[str, Any] | None = None  # loaded from a checkpoint before the monitor exists
        self._batch_examples: int | None = None  # examples of the batch being trained on, on this rank
        self._micro: list[int] = []  # this rank's examples of each backward pass in the current step
        self._losses: list[torch.Tensor] = []
        self._stepped = False
        self._failed = False
        self._finished = False
        self._trainer: Any = None

    # -- fit lifecycle ---------------------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._finished:
            raise ConfigError(
                "this NoiseScaleCallback already measured one fit() and closed its sinks; create a new callback for "
                "each fit()"
            )
        if isinstance(self.run_spec, (str, os.PathLike)) and self.run is None:
            # Created here, once the process group exists, so only global rank 0 writes a file.
            self.run = Run(self.run_name, dir=self.run_spec, config=self.run_config)
            self._owns_run = True

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        _check_strategy(trainer)
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"NoiseScaleCallback measures training with one optimizer, this LightningModule has "
                f"{len(trainer.optimizers)}: measure each model with a GNSMonitor of its own in the training step"
            )
        # trainer.strategy.model is the model as it is trained: DDP's wrapper, so the monitor sees the ranks.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.monitor = self.options.build(
            trainer.strategy.model, run=self.run, scaler=scaler, optimizer=trainer.optimizers[0]
        )
        if self._pending_state is not None:
            restore(self.monitor, self.options.sinks, self._pending_state, self.controller)
            self._pending_state = None
        if self.controller is not None:
            self._start_driving(trainer, pl_module)

    def _start_driving(self, trainer: Any, pl_module: Any) -> None:
        ctrl = self.controller
        assert ctrl is not None and self.monitor is not None
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "NoiseScaleCallback(controller=) sets accumulate_grad_batches, which manual optimization ignores: "
                "use automatic optimization, or drive the controller from your training_step"
            )
        if ctrl.config.world_size != trainer.world_size:
            raise ConfigError(
                f"the controller was built for world_size={ctrl.config.world_size}, the trainer runs on "
                f"{trainer.world_size} processes: build it with world_size={trainer.world_size}"
            )
        if any(type(cb).__name__ == "GradientAccumulationScheduler" for cb in trainer.callbacks):
            raise ConfigError(
                "NoiseScaleCallback(controller=) and GradientAccumulationScheduler both set accumulate_grad_batches: "
                "remove one of them"
            )
        start = ctrl.accumulation
        assert start is not None
        if self._trainer is None and trainer.accumulate_grad_batches not in (1, start):
            raise ConfigError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) but the controller starts at "
                f"{start} micro-batches a step and sets it itself: leave accumulate_grad_batches at 1"
            )
        self._trainer = trainer
        ctrl.attach(
            trainer.optimizers[0] if ctrl.awaits_optimizer else None,
            run=MonitorRun(self.monitor) if ctrl.run is None else None,
        )
        trainer.accumulate_grad_batches = start  # the controller's, also after a resume

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._failed = True

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._finished:
            return
        self._finished = True
        if self.monitor is not None:
            self.monitor.close()
        if self.controller is not None:
            self.controller.close()  # its hooks leave the optimizer; its state stays readable
        if self._owns_run and self.run is not None:
            self.run.close(status="failed" if self._failed else "finished")

    # -- one optimizer step ----------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_examples = count_examples(batch, self.batch_size_fn)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._batch_examples is None:
            raise StepError("NoiseScaleCallback saw a backward pass outside a training batch; it cannot count it")
        self._micro.append(self._batch_examples)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Called after the step's last backward pass, before Lightning clips the gradients and steps.
        if not self._micro or self.monitor is None:
            return  # no backward pass (training_step returned None): nothing was measured, nothing is stepped
        micro, self._micro = self._micro, []
        local = sum(micro)
        sizes = micro if len(set(micro)) > 1 else None
        # Every rank holds as many examples as this one (Lightning's DistributedSampler pads the last batch); the
        # monitor checks that on its first step under DDP.
        m = self.monitor.step(local * trainer.world_size, micro_batch_sizes=sizes)
        self.latest = m
        self._stepped = True
        if self.controller is not None:
            self._drive(trainer, m, micro)
        if self.log_columns and trainer._logger_connector.should_update_logs:
            # Reading the numbers waits for the device: only at the trainer's own logging cadence.
            pl_module.log_dict(
                log_values(m, self.log_columns),
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar,
                batch_size=m.batch_size,
            )

    def _drive(self, trainer: Any, m: Measurement, micro: list[int]) -> None:
        """Feed the controller this step's measurement (its multiplier applies to this step's optimizer.step())."""
        ctrl = self.controller
        assert ctrl is not None
        unit = ctrl.config.micro_batch
        assert unit is not None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done = progress.current.ready  # batches of this epoch so far, this one included
        epoch_ends = progress.is_last_batch or done == trainer.num_training_batches
        if any(n > unit for n in micro) or (not epoch_ends and any(n != unit for n in micro)):
            raise ConfigError(
                f"the controller was built for micro_batch={unit} examples per backward pass on one rank, this step's "
                f"batches had {micro}: build it with micro_batch=<the DataLoader's batch_size>"
            )
        decision, _ = ctrl.config.update(m, ctrl.state)  # pure: what the controller would decide now
        k = ctrl.config.accumulation(decision.batch_size)
        if k != ctrl.accumulation and not epoch_ends and k and done % k:
            m = Deferred(  # type: ignore[assignment]
                m,
                f"batch {decision.batch_before} -> {decision.batch_size} waits for a safe point: Lightning counts "
                f"accumulation from the epoch's start, and the {done} batches of this epoch so far are not a multiple "
                f"of {k}",
            )
        ctrl.step(m)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_examples = None
        if self.log_loss and pl_module.automatic_optimization and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                # Lightning divides each micro-batch's loss by accumulate_grad_batches: undo it for the mean.
                self._losses.append(loss.detach().reshape(()) * trainer.accumulate_grad_batches)
        if self._stepped:
            self._stepped = False
            if self._losses and self.monitor is not None:
                self.monitor.log({"loss": torch.stack(self._losses).mean()})  # read on the sink thread: no sync
            self._losses = []
            if self.controller is not None:
                # A step boundary the controller's accumulation can start at (_drive deferred it otherwise).
                trainer.accumulate_grad_batches = self.controller.accumulation

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, its stateful sinks' (an alert engine's) and the controller's, saved in Lightning's
        checkpoint."""
        if self.monitor is not None:
            return bundle(self.monitor, self.options.sinks, self.controller)
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``: now if training has started, else when it starts."""
        if not state_dict:
            return
        if self.monitor is not None:
            restore(self.monitor, self.options.sinks, state_dict, self.controller)
            if self.controller is not None and self._trainer is not None:
                self._trainer.accumulate_grad_batches = self.controller.accumulation
        else:
            self._pending_state = dict(state_dict)


def _check_lightning_controller(controller: object, source: str) -> BatchSizeController:
    ctrl = check_controller(controller, "NoiseScaleCallback")
    cfg = ctrl.config
    if cfg.micro_batch is None:
        raise ConfigError(
            "NoiseScaleCallback drives the batch through accumulate_grad_batches: build the controller with "
            "micro_batch=<the DataLoader's batch_size on one rank>"
        )
    start = ctrl.accumulation or 1
    if (
        cfg.world_size == 1
        and cfg.accumulation(cfg.grid.low) == 1
        and (source == "microbatch" or (source == "auto" and start >= 2))
    ):
        raise ConfigError(
            f"the controller may go down to one micro-batch a step, where source={source!r} (micro-batches, chosen "
            f"from the first step's {start}) has a single small batch and measures nothing: pass source='example'"
        )
    return ctrl


def _check_strategy(trainer: Any) -> None:
    """Refuse the strategies whose gradients the monitor cannot read, rather than measure them wrongly."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise ConfigError(
        f"NoiseScaleCallback measures single-device and DDP training (strategy='ddp', 'ddp_spawn', ...), got "
        f"{type(strategy).__name__}: FSDP's flat sharded parameters and DeepSpeed's partitioned gradients are not "
        "the gradients the monitor reads. For FSDP2 (fully_shard), call GNSMonitor(model) on the sharded model in "
        "your own loop"
    )
