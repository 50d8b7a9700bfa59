"""Adam's diagonal preconditioner, from the optimizer's state: the noise scale of the update direction.

Adam (Kingma & Ba 2015) moves each coordinate by ``m_hat / (sqrt(v_hat) + eps)``, with ``v_hat`` the
bias-corrected average of squared gradients.  Its critical batch size is set by the noise of that direction rather
than of the raw gradient, which McCandlish et al. (2018, sec. 2.2) suggest measuring by dividing the gradient's
coordinates by the square root of Adam's variance estimate, and Pollux (Qiao et al. 2021) does.  Every gradient the
estimator sees (each micro-batch's or rank's, and the step's) is divided by the same ``d`` before its squared norm
is taken, so that with ``D = diag(d)``::

    B_precond = tr(D^-1 Sigma D^-1) / |D^-1 G|^2

from the same unbiased two-batch estimator as ``B_simple``.

``d`` is the divisor Adam applies at this step: ``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2`` with ``g_t`` the step's
gradient (plus ``weight_decay * theta`` for Adam's coupled L2 decay), ``d = sqrt(v_t / (1 - beta2^t)) + eps``
(with ``amsgrad``, the running maximum of ``v``).  Pollux divides by ``v_{t-1}`` instead, which leaves out the
step's own gradient: a coordinate whose gradient has been near zero for a while (a rare token's embedding, an input
feature that is mostly zero) then divides a sudden gradient by almost nothing, and on the digits MLP the estimate
of the first steps came out 10^8 times its later level and kept spiking after.  With Adam's own divisor,
``|g_i / d_i| <= 1 / sqrt(1 - beta2)`` in every coordinate of the step's gradient.  It depends on the step's
gradient with weight ``1 - beta2`` only, so the estimator stays unbiased to that order.

Because ``d`` needs the whole step's gradient, the squares of the small batches cannot be taken as they arrive:
each hook adds the elementwise square of its gradient to a buffer (``S_p = sum_j c_j^2``, one copy of each measured
parameter, float32 at least), and when the backward pass ends both sums are taken against ``1 / d^2``.  Adam's
early divisors average few squared gradients and move fast, so the first ``WARMUP_STEPS`` optimizer steps are not
reported (their values would dominate the smoothing for many half-lives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import noisescale.optimizer_overrides as optimizer_overrides
from noisescale.errors import ConfigError
from noisescale.grad_norms import dense_values
from noisescale.stats import ParamSums

__all__ = ["STEPPED_BETWEEN", "WARMUP_STEPS", "AdamPreconditioner", "missing_sums", "warming_up"]

WARMUP_STEPS = 5
"""Optimizer steps before the preconditioned estimate starts (Pollux waits as many)."""
STEPPED_BETWEEN = (
    "the optimizer stepped between two backward passes of this step, so its micro-batches would be divided by two "
    "different preconditioners: call optimizer.step() once per step, after the last backward pass"
)
_UNREAD = (
    "the step's last backward pass was not read when it ended (a step with fewer backward passes than the one "
    "before), so its preconditioned sums are not known; the plain ones are"
)
_NOT_ADAM_STATE = (
    "the optimizer has stepped but keeps no exp_avg_sq for the measured parameters (an optimizer that shards or "
    "quantises Adam's state, such as ZeroRedundancyOptimizer or an 8-bit Adam, keeps it elsewhere): there is no "
    "divisor to read"
)
_DECAY_UNKNOWN = (
    "the controller's keep_horizons changes Adam's coupled L2 weight decay at each step by a factor decided after "
    "the gradient is measured, and that decay enters Adam's divisor: use AdamW (decoupled decay), or keep_horizons "
    "without 'weight_decay'"
)
_RADAM_UNRECTIFIED = "RAdam takes this step without its adaptive divisor (rho_t <= 5): there is none to measure"
_UNSUPPORTED = (
    "Adamax",
    "SparseAdam",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "SGD",
    "LBFGS",
    "Rprop",
    "ASGD",
    "ZeroRedundancyOptimizer",
)


class _NoDivisor(Exception):
    """This step's divisor cannot be known; the message says why."""


def warming_up(steps: int) -> str:
    """Why a step ``steps`` optimizer steps into training has no preconditioned value yet."""
    return (
        f"no preconditioned value in the optimizer's first {WARMUP_STEPS} steps (this is after {steps}): Adam's "
        "divisor sqrt(v_hat) + eps averages too few squared gradients to be stable yet"
    )


class AdamPreconditioner:
    """The squares of one step's small and big gradients, divided by Adam's ``sqrt(v_hat) + eps`` of the step.

    Works with ``torch.optim.Adam``, ``AdamW``, ``NAdam``, ``RAdam`` and any optimizer whose parameter groups have
    ``betas`` and ``eps`` and whose per-parameter state keeps ``exp_avg_sq`` and ``step`` as they do.

    Per step: the collectors' hooks call ``accumulate`` with each small batch's gradient; at the end of the
    backward pass ``read`` takes the big batch's sums and keeps the small batches'; ``small_sums`` hands those to
    the collector; ``reset`` starts the next step.

    Args:
        optimizer: the optimizer that trains the measured parameters.
        params: the measured parameters, ``(name, parameter)``; each must be in one of its parameter groups.

    Raises:
        ConfigError: ``optimizer`` is not an Adam-family optimizer, a measured parameter is not in it, or the
            parameters are sharded ``DTensor``s (FSDP2), whose sharded state this does not read.
    """

    def __init__(self, optimizer: Any, params: Sequence[tuple[str, nn.Parameter]]) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.steps_taken = 0  # optimizer.step() calls since attached: the version of Adam's state
        self._group_of: dict[int, int] = {}
        self._index_groups()
        missing = [n for n, p in params if id(p) not in self._group_of]
        if missing:
            raise ConfigError(
                f"precondition= divides each measured gradient by the optimizer's state, but {len(missing)} measured "
                f"parameter(s) are not in the optimizer given ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): pass the optimizer that trains the whole model, or freeze "
                "what it does not train (requires_grad=False)"
            )
        if any(type(p).__name__ == "DTensor" for _, p in params):
            raise ConfigError(
                "precondition= does not read sharded optimizer state (FSDP2's DTensor parameters): measure B_simple "
                "without it under FSDP2"
            )
        self._squares: dict[int, torch.Tensor] = {}  # id(param) -> sum of the small batches' squared gradients
        self._fresh: set[int] = set()  # the buffers written in this step
        self._small: dict[int, torch.Tensor] = {}  # id(param) -> sum_i S_i / d_i^2, from the last read
        self._version: int | None = None  # steps_taken at this step's first square
        self._unread = False  # a square came after the last read: the small sums would be stale
        self._steps_before: int | None = None  # the optimizer's steps before it was attached (read once)
        self.reason: str | None = None  # why this step has no preconditioned sums
        self.stopped: str | None = None  # why nothing is gathered any more (the source chosen does not use it)
        self._seen_state = False  # some parameter's state held exp_avg_sq
        self._handle = optimizer.register_step_post_hook(self._stepped)

    def _stepped(self, *_: object) -> None:
        self.steps_taken += 1

    def _index_groups(self) -> None:
        self._group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}

    # -- hooks -------------------------------------------------------------------------------------------------

    def accumulate(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        """Add a small batch's gradient, squared elementwise, to ``param``'s buffer (one fused multiply-add)."""
        if self.stopped is not None:
            return
        if self._version is None:
            self._version = self.steps_taken
        if grad.is_sparse:  # Adam refuses sparse gradients; an optimizer that takes them keeps other state
            self.reason = "a sparse gradient cannot be preconditioned by Adam's dense state"
            return
        g = dense_values(grad)
        key = id(param)
        buf = self._squares.get(key)
        if buf is None or buf.shape != g.shape or buf.device != g.device:
            dtype = torch.promote_types(g.dtype, torch.float32)  # half-precision squares overflow
            buf = self._squares[key] = torch.empty(g.shape, dtype=dtype, device=g.device)
        self._unread = True
        if key in self._fresh:
            buf.addcmul_(g, g)
        elif g.dtype == buf.dtype:
            torch.mul(g, g, out=buf)
        else:
            buf.copy_(g).square_()
        self._fresh.add(key)

    # -- end of the backward pass ------------------------------------------------------------------------------

    def read(self, params: Sequence[nn.Parameter], scale: float | torch.Tensor | None) -> ParamSums | None:
        """``|p.grad / d|^2`` per parameter (``0`` without a gradient), keeping the small batches' sums.

        Args:
            params: the parameters whose big-batch norms are read.
            scale: the loss scale the gradients carry, so that ``d`` is made from the gradient Adam will see.

        Returns:
            The big batch's sums (Python floats for gradients in host memory, else a float64 tensor), or ``None``
            when this step has none (``reason`` says why).
        """
        self._unread = False
        if self.stopped is not None:
            self.reason = self.stopped
            return None
        if self._version is not None and self._version != self.steps_taken:
            self.reason = STEPPED_BETWEEN
        steps = self._optimizer_steps(params)
        if steps < WARMUP_STEPS:
            self.reason = warming_up(steps)
        elif not self._seen_state:
            self._seen_state = any("exp_avg_sq" in st for st in self.optimizer.state.values())
            if not self._seen_state:
                self.reason = _NOT_ADAM_STATE
        if self.reason is not None:
            return None
        big: list[torch.Tensor | None] = []
        self._small = {}
        try:
            for p in params:
                grad = p.grad
                if grad is None or grad.is_sparse:
                    big.append(None)
                    continue
                g = dense_values(grad)
                w = self._inverse_square(p, g, scale)
                big.append(torch.dot((g * w).reshape(-1), g.reshape(-1).to(w.dtype)))
                buf = self._squares.get(id(p))
                if buf is not None and id(p) in self._fresh:
                    self._small[id(p)] = torch.dot(buf.reshape(-1), w.reshape(-1).to(buf.dtype))
        except _NoDivisor as e:
            self.reason = str(e)
            self._small = {}
            return None
        return _param_sums(big)

    def small_sums(self, params: Sequence[nn.Parameter]) -> ParamSums:
        """``sum_j |c_{j,p} / d_p|^2`` per parameter from the last ``read``; ``missing_sums`` when ``reason`` says
        why this step has none."""
        if self.reason is None and self._unread:
            self.reason = _UNREAD
        if self.reason is not None:
            return missing_sums(len(params))
        return _param_sums([self._small.get(id(p)) for p in params])

    def reset(self) -> None:
        """The step is over: the next square starts each buffer afresh."""
        self._fresh = set()
        self._small = {}
        self._version = None
        self._unread = False
        self.reason = None

    def stop(self, reason: str) -> None:
        """Gather nothing from now on and free the buffers: the source in use does not use them."""
        self.stopped = reason
        self._squares = {}
        self._small = {}

    def close(self) -> None:
        self._handle.remove()
        self._squares = {}

    # -- internals ---------------------------------------------------------------------------------------------

    def _optimizer_steps(self, params: Sequence[nn.Parameter]) -> int:
        """Steps the optimizer has taken (its state's count when first read, a resumed run's too; then counted)."""
        if self._steps_before is None:
            step = next((st["step"] for p in params if (st := self.optimizer.state.get(p)) and "step" in st), 0)
            self._steps_before = int(step) - self.steps_taken  # a tensor on a device is read once, here
        return self._steps_before + self.steps_taken

    def _inverse_square(
        self, param: nn.Parameter, grad: torch.Tensor, scale: float | torch.Tensor | None
    ) -> torch.Tensor:
        """``1 / d^2``, with ``d`` Adam's divisor of this step (the module docstring), float32 at least."""
        if id(param) not in self._group_of:  # a parameter group added since
            self._index_groups()
        group = self.optimizer.param_groups[self._group_of[id(param)]]
        upcoming = optimizer_overrides.next_step_values(self.optimizer, group)  # a controller's keep_horizons
        beta2, eps = upcoming.get("betas", group["betas"])[1], group["eps"]
        state = self.optimizer.state.get(param) or {}
        if state and "exp_avg_sq" not in state:
            raise _NoDivisor(_NOT_ADAM_STATE)
        g = grad.to(torch.promote_types(grad.dtype, torch.float32))
        if scale is not None:
            g = g / scale
        decay = upcoming.get("weight_decay", group.get("weight_decay", 0.0))
        if decay and not _decoupled(self.optimizer, group):  # Adam's L2 decay is part of the gradient it squares
            if decay is optimizer_overrides.UNKNOWN:
                raise _NoDivisor(_DECAY_UNKNOWN)
            g = g.add(param.detach(), alpha=decay)
        v = state.get("exp_avg_sq")
        v_t = g.square().mul_(1 - beta2) if v is None else torch.addcmul(v * beta2, g, g, value=1 - beta2)
        if group.get("amsgrad") and "max_exp_avg_sq" in state:
            v_t = torch.maximum(v_t, state["max_exp_avg_sq"])
        step = state.get("step", 0)
        # this step's count; a tensor on the device (capturable, fused) stays there: no host read
        t = step + 1 if isinstance(step, torch.Tensor) and step.device.type != "cpu" else float(step) + 1
        correction = 1 - beta2**t
        if isinstance(self.optimizer, torch.optim.RAdam):
            # RAdam divides by (sqrt(v) + eps) / sqrt(1 - beta2^t), and not at all while rho_t <= 5.
            rho_inf = 2 / (1 - beta2) - 1
            if rho_inf - 2 * float(t) * beta2 ** float(t) / float(correction) <= 5:
                raise _NoDivisor(_RADAM_UNRECTIFIED)
            d = v_t.sqrt_().add_(eps) / correction**0.5
        else:
            d = (v_t / correction).sqrt_().add_(eps)
        return d.square_().reciprocal_()


def missing_sums(n_params: int) -> ParamSums:
    """What a collector reports for a step it cannot precondition (with the reason): NaN for every parameter.

    Under data parallelism every rank must send the same number of values, and a NaN makes the sum over ranks NaN,
    so the ranks that could precondition the step leave it out as non-finite (status ``"skipped"``) without having
    to read a flag back from the device; the rank that could not says why (``"undefined"``).
    """
    return ParamSums([math.nan] * n_params)


def _decoupled(optimizer: Any, group: dict[str, Any]) -> bool:
    return bool(group.get("decoupled_weight_decay")) or isinstance(optimizer, torch.optim.AdamW)


def _param_sums(squares: list[torch.Tensor | None]) -> ParamSums:
    """Per-parameter 0-d squares as ``ParamSums`` (``0`` where ``None``): floats on a CPU, else a device tensor."""
    present = [s for s in squares if s is not None]
    if not present or all(s.device.type == "cpu" for s in present):
        return ParamSums([0.0 if s is None else s.item() for s in squares])
    device = present[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return ParamSums(torch.stack([zero if s is None else s.to(device, torch.float64) for s in squares]))


def _check_optimizer(optimizer: Any) -> None:
    name = type(optimizer).__name__
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(optimizer, torch.optim.Optimizer) or not groups:
        raise ConfigError(
            f"precondition= takes the Adam-family optimizer that trains the model (torch.optim.Adam, AdamW, ...), "
            f"got {name}"
        )
    if name in _UNSUPPORTED or not all("betas" in g and "eps" in g for g in groups):
        raise ConfigError(
            f"precondition= reads Adam's second-moment state (exp_avg_sq, betas, eps), which {name} does not keep: "
            "pass an Adam, AdamW, NAdam or RAdam optimizer, or leave precondition out (SGD's noise scale is "
            "B_simple itself)"
        )
