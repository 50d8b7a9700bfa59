"""``NoiseScaleTrainerCallback``: the gradient noise scale of a ``transformers.Trainer`` run (TRL's trainers too).

::

    from noisescale.integrations.huggingface import NoiseScaleTrainerCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[NoiseScaleTrainerCallback(run="runs")])
    trainer.train()            # the logs gain noisescale/b_simple, noisescale/band/low, ...

What it measures is what backward produced: the monitor reads ``|p.grad|^2`` when the last backward pass of a step
ends, so the Trainer's clipping (``max_grad_norm``), which comes before ``on_pre_optimizer_step``, changes nothing.
The Trainer does not show callbacks its batches, so the examples of each micro-batch are counted by a forward
pre-hook on the model (the rows of ``input_ids``, or of its first tensor input) while it trains with gradients;
evaluation and reference-model passes are not counted.

Preference trainers run the chosen and the rejected completion of each pair as two rows of one forward pass, and
their loss couples the two: with TRL's ``DPOConfig`` or ``RewardConfig`` the callback counts two rows as one
example and tells the monitor that the loss couples the rows (``loss_couples_examples``), so ``source="auto"``
measures micro-batches of pairs (use ``gradient_accumulation_steps >= 2``).

With ``controller=`` the callback couples the learning rate to the measurement: each step's measurement goes to an
``ns.BatchSizeController`` (built with ``optimizer="later"``; the callback attaches the Trainer's optimizer), whose
multiplier scales that step's ``optimizer.step()``.  The batch itself stays fixed: the Trainer computes its epochs,
its scheduler's total steps and Accelerate's gradient synchronisation from ``gradient_accumulation_steps`` once, so
changing it during training is not safe, and a controller that could change the batch is refused.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from noisescale.controllers.controller import BatchSizeController
from noisescale.errors import ConfigError, StepError
from noisescale.integrations._checkpoint import bundle, from_json, restore, to_json
from noisescale.integrations._driving import MonitorRun, check_controller, fixed_batch, innermost_optimizer
from noisescale.integrations._examples import first_tensor_rows
from noisescale.integrations._log_values import DEFAULT_COLUMNS, check_columns, log_values
from noisescale.integrations._options import MonitorOptions
from noisescale.integrations._versions import Supported, require
from noisescale.monitor import GNSMonitor
from noisescale.sink import Sink
from noisescale.source_choice import Source
from noisescale.store import Run
from noisescale.types import Measurement

__all__ = ["PAIRED_CONFIGS", "SUPPORTED", "TRL_SUPPORTED", "NoiseScaleTrainerCallback"]

SUPPORTED = Supported(
    distribution="transformers",
    minimum=(4, 45),
    below=(6,),
    extra="hf",
    what="noisescale.integrations.huggingface.NoiseScaleTrainerCallback",
)

TRL_SUPPORTED = Supported(
    distribution="trl",
    minimum=(1, 0),
    below=(2,),
    extra="trl",
    what="noisescale.integrations.huggingface.NoiseScaleTrainerCallback (with TRL's trainers)",
)
"""TRL's range: how its preference trainers lay out a pair (two rows of one pass) is what the callback counts on."""

_transformers = require("transformers", SUPPORTED)
_callbacks = require("transformers.trainer_callback", SUPPORTED)

PAIRED_CONFIGS = frozenset({"DPOConfig", "RewardConfig"})
"""TRL configurations whose trainers run each pair as two rows (chosen, rejected) of one forward pass."""

_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
BatchSizeFn = Callable[[Any], int]
"""The model's inputs (the dict the Trainer passes as ``model(**inputs)``) -> number of examples."""


class NoiseScaleTrainerCallback(_callbacks.TrainerCallback, _callbacks.ExportableState):  # type: ignore[name-defined]
    """Measures B_simple at every optimizer step of ``Trainer.train``, adds it to the logs, keeps it in checkpoints.

    Args:
        source: the monitor's source (``GNSMonitor``): ``"auto"`` picks ``microbatch`` with
            ``gradient_accumulation_steps >= 2``, else ``example``.
        sinks: where every measurement, metric and event also goes (``ns.alerts.default_rules()`` for alerts,
            ``ns.sinks.TensorBoard(...)``, ...); closed when training ends.
        run: a run store: an ``ns.Run`` (left open for you to close), or a folder, where the callback creates a
            run when training starts and closes it when training ends.
        run_name: the name of a run the callback creates.
        run_config: the settings recorded with a run the callback creates.
        callbacks: functions called with every ``Measurement``, on the monitor's sink thread.
        batch_size_fn: the model's inputs -> number of examples; by default the rows of ``input_ids`` (or of the
            first tensor input) divided by ``rows_per_example``.
        rows_per_example: rows of a forward pass per example; ``None``: 2 under TRL's ``DPOConfig`` and
            ``RewardConfig`` (chosen and rejected), else 1.
        log_columns: measurement columns added to the Trainer's logs at its ``logging_steps``
            (``noisescale/b_simple``, ``noisescale/band/low``, ..., with ``noisescale/batch_size``).
        loss_couples_examples: as for ``GNSMonitor``; ``None``: ``True`` for the paired TRL configurations.
        per_layer, halflife, confidence, on_unsupported, scope: as for ``GNSMonitor``.
        precondition: also measure Adam's preconditioned noise scale with the Trainer's optimizer
            (``GNSMonitor(precondition=)``; needs micro-batches: ``gradient_accumulation_steps >= 2``).
        controller: an ``ns.BatchSizeController`` with a fixed batch (``"constant"``, or ``min_batch == max_batch``)
            equal to ``per_device_train_batch_size x gradient_accumulation_steps``, built with ``optimizer="later"``:
            its learning-rate multiplier (e.g. ``lr_rule="adascale"`` with ``base_batch`` the batch your learning
            rate was tuned for) scales every optimizer step; its metrics and state follow the monitor's.

    Checkpoints: the state goes into ``trainer_state.json`` (``ExportableState``), and the callback restores it
    itself when training resumes from a checkpoint.  With ``restore_callback_states_from_checkpoint=True`` the
    Trainer builds a new callback from that state; it takes over the sinks and options of the callback it replaces.

    Raises:
        FrameworkVersionError: the installed transformers lies outside the supported range.
        ConfigError: a bad option (the monitor's own checks, made now).
    """

    _live: ClassVar[weakref.WeakSet[NoiseScaleTrainerCallback]] = weakref.WeakSet()

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
        rows_per_example: int | None = None,
        log_columns: Sequence[str] = DEFAULT_COLUMNS,
        per_layer: bool = True,
        halflife: float | None = None,
        confidence: float = 0.9,
        on_unsupported: Any = None,
        scope: Any = "all",
        loss_couples_examples: bool | None = None,
        precondition: bool = False,
        controller: BatchSizeController | None = None,
        restored_by_trainer: bool = False,
    ) -> None:
        SUPPORTED.check(SUPPORTED.installed(_transformers))
        _check_trl()
        if restored_by_trainer:  # built by Trainer._load_callback_state from state(): take over the live callback
            self._take_over()
            return
        self.options = MonitorOptions(
            source=source,
            per_layer=per_layer,
            halflife=halflife,
            confidence=confidence,
            on_unsupported=on_unsupported,
            scope=scope,
            loss_couples_examples=bool(loss_couples_examples),
            sinks=tuple(sinks) if isinstance(sinks, (list, tuple)) else sinks,
            callbacks=tuple(callbacks),
            precondition=bool(precondition),
        )
        self.options.check()
        if run is not None and not isinstance(run, (str, os.PathLike)) and not callable(getattr(run, "log", None)):
            raise ConfigError(f"run must be an ns.Run or a folder to create one in, got {type(run).__name__}")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ConfigError(f"batch_size_fn must be a function inputs -> number of examples, got {batch_size_fn!r}")
        if rows_per_example is not None and (
            isinstance(rows_per_example, bool) or not isinstance(rows_per_example, int) or rows_per_example < 1
        ):
            raise ConfigError(f"rows_per_example must be a positive int or None, got {rows_per_example!r}")
        self.run_spec = run
        self.run_name = run_name
        self.run_config = dict(run_config or {})
        self.batch_size_fn = batch_size_fn
        self.rows_per_example = rows_per_example
        self.loss_couples_examples = loss_couples_examples
        self.log_columns = check_columns(log_columns)
        self.controller = None if controller is None else _check_trainer_controller(controller)

        self.monitor: GNSMonitor | None = None
        self.run: Any = run if run is not None and not isinstance(run, (str, os.PathLike)) else None
        self.latest: Measurement | None = None
        self.saved_state: Any = None  # set by the Trainer when it rebuilds this callback from a checkpoint
        self._owns_run = False
        self._rows = 0  # rows of the training forward passes since the last micro-batch ended
        self._examples_now = 0
        self._micro: list[int] = []
        self._per_example = 1
        self._hook: Any = None
        self._finished = False
        self._taken_over = False
        NoiseScaleTrainerCallback._live.add(self)

    # -- checkpoints (ExportableState) -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-ready state for ``trainer_state.json``: the monitor's and its stateful sinks' (tensors as lists)."""
        saved = to_json(bundle(self.monitor, self.options.sinks, self.controller)) if self.monitor is not None else None
        return {"args": {"restored_by_trainer": True}, "attributes": {"saved_state": saved}}

    def _take_over(self) -> None:
        """Become the live callback the Trainer is replacing (it passes only JSON, and sinks are not JSON)."""
        waiting = [cb for cb in NoiseScaleTrainerCallback._live if cb.monitor is None and not cb._taken_over]
        if len(waiting) != 1:
            raise ConfigError(
                "restore_callback_states_from_checkpoint=True rebuilds callbacks from JSON, and a "
                "NoiseScaleTrainerCallback's sinks cannot be JSON: it takes over the callback passed to the Trainer, "
                f"but found {len(waiting)} waiting to train. Pass one NoiseScaleTrainerCallback to the Trainer, or "
                "leave restore_callback_states_from_checkpoint=False: the callback restores its state either way"
            )
        original = waiting[0]
        self.__dict__.update(original.__dict__)
        original._taken_over = True

    # -- training lifecycle ----------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if self._finished:
            raise ConfigError(
                "this NoiseScaleTrainerCallback already measured one train() and closed its sinks; create a new "
                "callback for each train()"
            )
        if model is None:
            raise ConfigError("the Trainer passed no model to the callback: cannot measure")
        world = int(getattr(args, "world_size", 1) or 1)
        n_gpu = int(getattr(args, "n_gpu", 1) or 1)
        if world > 1 or n_gpu > 1:
            raise ConfigError(
                f"NoiseScaleTrainerCallback measures single-process training; this run has {world} processes and "
                f"{n_gpu} devices per process, and a callback only sees the unwrapped model, not DDP's. Measure "
                "multi-process training with the Lightning callback or with GNSMonitor(ddp_model) in an Accelerate "
                "loop (noisescale.integrations.accelerate)"
            )
        if any(cls.__module__.split(".")[0] == "trl" for cls in type(args).__mro__):
            _check_trl(required=True)
        paired = _paired_config(args)
        self._per_example = self.rows_per_example or (2 if paired else 1)
        couples = self.loss_couples_examples if self.loss_couples_examples is not None else paired
        if isinstance(self.run_spec, (str, os.PathLike)) and self.run is None:
            self.run = Run(self.run_name, dir=self.run_spec, config=self.run_config)
            self._owns_run = True
        optimizer = kwargs.get("optimizer")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's optimizer wrapper holds the GradScaler
        self.monitor = self.options.build(
            model, run=self.run, scaler=scaler, optimizer=optimizer, loss_couples_examples=couples
        )
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        saved = self.saved_state
        if saved is None and state.global_step > 0:  # resuming: the Trainer loaded trainer_state.json
            entry = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(entry, list):
                raise ConfigError(
                    "the checkpoint holds the states of several NoiseScaleTrainerCallbacks; pass one per Trainer"
                )
            saved = (entry or {}).get("attributes", {}).get("saved_state")
        if saved is not None:
            restore(self.monitor, self.options.sinks, from_json(saved), self.controller)
            self.saved_state = None
        if self.controller is not None:
            self._attach_controller(args, optimizer)

    def _attach_controller(self, args: Any, optimizer: Any) -> None:
        ctrl = self.controller
        assert ctrl is not None and self.monitor is not None
        batch = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps)
        if ctrl.batch_size != batch:
            raise ConfigError(
                f"the controller's batch is {ctrl.batch_size}, the Trainer's per_device_train_batch_size x "
                f"gradient_accumulation_steps is {batch}: build the controller with batch_size={batch} (and "
                "base_batch= the batch your learning rate was tuned for)"
            )
        if ctrl.awaits_optimizer:
            if optimizer is None:
                raise ConfigError("the Trainer passed no optimizer to the callback: the controller cannot scale it")
            ctrl.attach(innermost_optimizer(optimizer))
        if ctrl.run is None:
            ctrl.attach(run=MonitorRun(self.monitor))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close("finished")

    def _close(self, status: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()
        if self.controller is not None:
            self.controller.close()  # its hooks leave the optimizer; its state stays readable
        if self._owns_run and self.run is not None:
            self.run.close(status=status)

    # -- one optimizer step ----------------------------------------------------------------------------------------

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: count the examples of a training pass (gradients on, training mode)."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, or a reference or precomputation pass
        inputs: Any = kwargs if kwargs else args
        if self.batch_size_fn is not None:
            n = self.batch_size_fn(inputs)
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ConfigError(f"batch_size_fn must return the number of examples (a positive int), got {n!r}")
            self._examples_now += n
            return
        rows = next((first_tensor_rows(kwargs[k]) for k in _INPUT_KEYS if k in kwargs), None)
        if rows is None:
            rows = first_tensor_rows(list(args)) or first_tensor_rows(kwargs)
        if rows is None:
            raise ConfigError(
                "cannot count the examples of the model's inputs: no tensor among them; pass batch_size_fn=lambda "
                "inputs: <number of examples> to NoiseScaleTrainerCallback"
            )
        if rows % self._per_example:
            raise StepError(
                f"a training forward pass had {rows} rows, not a multiple of rows_per_example={self._per_example} "
                "(chosen and rejected rows of a preference pair); pass rows_per_example= or batch_size_fn="
            )
        self._examples_now += rows // self._per_example

    def _end_micro_batch(self) -> None:
        if self._examples_now:
            self._micro.append(self._examples_now)
        self._examples_now = 0

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_micro_batch()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the step's last backward pass and the Trainer's clipping, before the optimizer steps.
        self._end_micro_batch()
        if not self._micro or self.monitor is None:
            return
        sizes = self._micro if len(set(self._micro)) > 1 else None
        batch = sum(self._micro)
        self._micro = []
        self.latest = self.monitor.step(batch, micro_batch_sizes=sizes)
        if self.controller is not None:
            self.controller.step(self.latest)  # its multiplier scales the optimizer step that follows

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or self.monitor is None:
            return  # evaluation or end-of-training summaries carry no training loss: nothing measured to add
        # With a controller, "lr" is the learning rate each step used (logged by the controller), not the schedule's.
        lr = None if self.controller is not None else logs.get("learning_rate")
        self.monitor.log({k: v for k, v in (("loss", logs.get("loss")), ("lr", lr)) if _num(v)})
        if self.latest is None or not self.log_columns:
            return
        values = log_values(self.latest, self.log_columns)  # reads the measurement: at the logging cadence only
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)  # the Trainer copied logs into its history before calling the callbacks


def _check_trainer_controller(controller: object) -> BatchSizeController:
    ctrl = check_controller(controller, "NoiseScaleTrainerCallback")
    if not fixed_batch(ctrl):
        raise ConfigError(
            "NoiseScaleTrainerCallback couples the learning rate only: the Trainer computes its epochs, its "
            "scheduler's total steps and Accelerate's gradient synchronisation from gradient_accumulation_steps once, "
            f"so changing the batch during training is not safe, and this controller (policy={ctrl.config.policy!r}, "
            f"batches {ctrl.config.grid.low} to {ctrl.config.grid.high}) may change it. Build one with a fixed batch, "
            "e.g. ns.BatchSizeController('constant', batch_size=<per_device_train_batch_size x "
            "gradient_accumulation_steps>, base_batch=<the batch your learning rate was tuned for>, "
            "lr_rule='adascale', optimizer='later'), or drive the batch with the Lightning callback or a plain loop"
        )
    return ctrl


def _check_trl(*, required: bool = False) -> None:
    """Refuse a TRL outside ``TRL_SUPPORTED`` once it is imported (a plain Trainer run never needs it)."""
    trl = sys.modules.get("trl")
    if trl is None and required:
        trl = require("trl", TRL_SUPPORTED)
    if trl is not None:
        TRL_SUPPORTED.check(TRL_SUPPORTED.installed(trl))


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _paired_config(args: Any) -> bool:
    """Whether ``args`` is one of TRL's paired preference configurations (or a subclass of one)."""
    return any(cls.__name__ in PAIRED_CONFIGS and cls.__module__.split(".")[0] == "trl" for cls in type(args).__mro__)
