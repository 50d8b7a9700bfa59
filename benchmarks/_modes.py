"""The modes ``overhead.py`` times: plain training steps, noisescale's monitor, and peer libraries.

One *step* is ``zero_grad``, forward, backward (over ``n_micro`` micro-batches, each loss divided by
``n_micro``), the mode's statistics, and an SGD step.  Statistics are computed on every step and left on the
device as tensors (no ``.item()``), except where a mode reads its value on purpose (``ns_example`` reads
``m.b_simple`` so any device synchronisation is paid).

Every mode can also ``validate(x, y)`` at its current (initial) parameters: one step's backward on one batch,
returning what is checked against the exact float64 reference in ``overhead.py``.

A peer whose package is missing is *skipped*: list the import in ``needs``.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from _workloads import N_MICRO, Workload

LR = 1e-2


class Skip(Exception):
    """The mode cannot run here for an expected reason (an optional package is missing, wrong workload)."""


@dataclass
class Validation:
    """What one backward pass at the initial parameters gave.

    Attributes:
        per_example_sq: per parameter name, ``(B,)`` squared norms of each example's gradient of its own loss
            (mean over its tokens), in float64; ``None`` for modes without per-example norms.
        b_simple: the mode's own B_simple for this one step, when it computes one (noisescale).
        estimator: ``"per_example"`` (small batches of one example) or ``"micro"`` (``N_MICRO`` micro-batches).
        coverage: fraction of the parameters measured, when the mode reports it.
        covered: names of the parameters the B_simple / norms cover (``None``: all).
        big_sq: ``|p.grad|^2`` summed over ``covered``, for modes that leave B_simple to the caller (peers).
    """

    per_example_sq: dict[str, torch.Tensor] | None = None
    b_simple: float | None = None
    estimator: str = "per_example"
    coverage: float | None = None
    covered: list[str] | None = None
    big_sq: float | None = None
    notes: list[str] = field(default_factory=list)


class Mode:
    """Plain training: no statistics.  Subclasses override ``setup``, ``backward``, ``statistics``, ``validate``."""

    name: ClassVar[str] = "plain"
    baseline: ClassVar[str | None] = None  # the mode whose steps this one's ratio is taken against
    n_micro: ClassVar[int] = 1
    needs: ClassVar[tuple[str, ...]] = ()  # importable modules; a missing one skips the mode
    peer: ClassVar[str | None] = None  # distribution name, for the versions in the JSON
    workloads: ClassVar[tuple[str, ...] | None] = None  # None: every workload
    period: ClassVar[int] = 1  # steps of one cadence period: blocks are whole periods, compared by their means

    def __init__(self, wl: Workload, state: dict[str, torch.Tensor]) -> None:
        if self.workloads is not None and wl.name not in self.workloads:
            raise Skip(f"only on {', '.join(self.workloads)}")
        for mod in self.needs:
            if importlib.util.find_spec(mod) is None:
                raise Skip(f"{mod} is not installed")
        self.wl = wl
        self.notes: list[str] = []
        self.model = wl.make_model()
        self.model.load_state_dict(state)
        self.model.train()
        self.net: nn.Module = self.model  # what forward calls (a peer may wrap the model)
        self.setup()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def setup(self) -> None:
        pass

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        k = self.n_micro
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            loss = self.wl.loss(self.net(xm), ym)
            (loss / k if k > 1 else loss).backward()

    def statistics(self, batch_size: int) -> None:
        pass

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.zero_grad()
        self.backward(x, y)
        self.statistics(x.shape[0])
        self.opt.step()

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> Validation | None:
        return None

    def close(self) -> None:
        pass


class PlainAccumMode(Mode):
    name = "plain_accum"
    baseline = "plain"
    n_micro = N_MICRO


# -- noisescale ------------------------------------------------------------------------------------------------


class NsExampleMode(Mode):
    """``GNSMonitor(model, source="example")``; ``monitor.step`` and a read of ``m.b_simple`` every step."""

    name = "ns_example"
    baseline = "plain"
    source: ClassVar[str] = "example"
    scope: ClassVar[str] = "all"
    read: ClassVar[bool] = True

    def setup(self) -> None:
        from noisescale.errors import SharedParameterError, UnsupportedLayerError

        self.policy = "error"
        try:
            self.monitor = self.make_monitor()
        except (UnsupportedLayerError, SharedParameterError) as e:
            # Measure what is supported; the coverage column shows what was left out.
            self.notes.append(f"partial coverage: {type(e).__name__}: {str(e)[:240]}")
            self.policy = "ignore"
            self.monitor = self.make_monitor()
        self.last: Any = None

    def monitor_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"source": self.source}
        if self.source == "example":
            kw.update(on_unsupported=self.policy, scope=self.scope)
        return kw

    def make_monitor(self) -> Any:
        from noisescale import GNSMonitor

        return GNSMonitor(self.model, **self.monitor_kwargs())

    def statistics(self, batch_size: int) -> None:
        m = self.monitor.step(batch_size)
        self.last = m.b_simple if self.read else m

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> Validation:
        from noisescale.collectors.example import ExampleCollector

        self.zero_grad()
        self.backward(x, y)
        m = self.monitor.step(x.shape[0])
        covered = list(m.layers) if self.n_micro == 1 else None  # per_layer=True: one row per measured tensor
        val = Validation(b_simple=m.b_simple_raw, coverage=m.coverage, covered=covered, notes=list(self.notes))
        if self.n_micro > 1:
            val.estimator = "micro"
            return val
        # Per-example norms from a separate collector on a fresh copy of the model (shares of p.grad).
        model = self.wl.make_model()
        model.load_state_dict(self.model.state_dict())
        col = ExampleCollector(model, on_unsupported=self.policy, scope=self.scope, keep_per_example=True)
        try:
            self.wl.loss(model(x), y).backward()
            b = x.shape[0]
            # mean loss: each example's share of p.grad is g_i / B
            val.per_example_sq = {n: v.double() * b * b for n, v in col.per_example_sq_norms().items()}
        finally:
            col.close()
        return val

    def close(self) -> None:
        self.monitor.close()


class NsEvery10Mode(NsExampleMode):
    """``GNSMonitor(model, source="example", every=10)``: one step in ten measured, the hooks disarmed on the others.

    Timed in blocks of whole periods (``period``) and compared by mean step time: a median would skip the measured
    step."""

    name = "ns_every10"
    period = 10

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "every": 10}


class NsDisarmedMode(NsExampleMode):
    """A monitor whose hooks stay disarmed after its first step (``every`` beyond the run): what an unmeasured step
    costs."""

    name = "ns_disarmed"

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "every": 10**9}


class NsBudgetMode(NsExampleMode):
    """``GNSMonitor(model, source="example", budget=0.03)``: the cadence chosen from the monitor's own timed cost.

    The budget times the interval from one ``monitor.step()`` to the next as a training step.  Here the modes run
    interleaved, so between two blocks that interval would hold every other mode's block too (seconds of "training"
    that make the measurements look cheap): the monitor's clock is replaced by one that only runs inside this
    mode's own steps, which is what the budget sees in a loop of its own.  ``close()`` prints the share of steps
    measured and the cadences chosen."""

    name = "ns_budget"
    period = 20

    def setup(self) -> None:
        super().setup()
        self._spent = 0.0  # seconds inside this mode's steps so far
        self._began: float | None = None
        self.steps = self.measured = 0
        self.monitor._cadence._clock = self._clock  # private: a benchmark's stand-in for an uninterrupted loop

    def _clock(self) -> float:
        return self._spent + (0.0 if self._began is None else time.perf_counter() - self._began)

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "budget": 0.03}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._began = time.perf_counter()
        try:
            super().step(x, y)
        finally:
            self._spent += time.perf_counter() - self._began
            self._began = None

    def statistics(self, batch_size: int) -> None:
        super().statistics(batch_size)
        self.steps += 1
        self.measured += self.monitor.step_count == self.monitor._last_measured_step

    def close(self) -> None:
        every = self.monitor._cadence.every
        print(f"[{self.wl.name}] ns_budget: measured {self.measured} of {self.steps} timed steps; last every={every}")
        super().close()


class NsSketchMode(NsExampleMode):
    """``GNSMonitor(model, source="example", sketch=64)``: sketched per-example norms where they pay."""

    name = "ns_sketch64"

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "sketch": 64}

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> Validation:
        val = super().validate(x, y)  # the per-example norms below are the exact collector's
        val.b_simple = None  # one sketched step's B_simple is an estimate: checked in tests, not against exact
        return val


class NsMicrobatchEvery10Mode(NsExampleMode):
    """``GNSMonitor(model, source="microbatch", every=10)`` over ``N_MICRO`` micro-batches."""

    name = "ns_microbatch_every10"
    baseline = "plain_accum"
    source = "microbatch"
    n_micro = N_MICRO
    period = 10

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "every": 10}


class NsExampleNoReadMode(NsExampleMode):
    """As ``ns_example`` but the measurement is never read (no host sync at all)."""

    name = "ns_example_noread"
    read = False


class NsNormMode(NsExampleMode):
    """``scope="norm"``: only LayerNorm parameters (Gray et al. 2024's cheap proxy)."""

    name = "ns_norm"
    scope = "norm"
    workloads = ("tiny_transformer",)


class NsMicrobatchMode(NsExampleMode):
    """``GNSMonitor(model, source="microbatch")`` over ``N_MICRO`` accumulated micro-batches."""

    name = "ns_microbatch"
    baseline = "plain_accum"
    source = "microbatch"
    n_micro = N_MICRO


def open_store_run(directory: str) -> Any:
    """A run of ``noisescale.store`` writing under ``directory``: the object passed as ``GNSMonitor(run=...)``.

    The only place that knows the store's constructor; ``NsStoreMode`` is skipped while the module is absent.
    """
    from noisescale.store import Run

    return Run("overhead-bench", dir=directory)


class NsStoreMode(NsExampleMode):
    """``ns_example`` with the run store on: every measurement goes to ``GNSMonitor(run=...)``."""

    name = "ns_example_store"
    needs = ("noisescale.store",)

    def setup(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="ns-bench-store-")
        self.run = open_store_run(self._dir)
        super().setup()

    def monitor_kwargs(self) -> dict[str, Any]:
        return {**super().monitor_kwargs(), "run": self.run}

    def close(self) -> None:
        super().close()
        closer = getattr(self.run, "close", None)
        if callable(closer):
            closer()
        shutil.rmtree(self._dir, ignore_errors=True)


# -- peers -----------------------------------------------------------------------------------------------------


class PeerMode(Mode):
    """A peer library's per-example squared norms; each step also sums them and takes ``|p.grad|^2``,
    the statistics B_simple needs, kept as tensors."""

    baseline = "plain"

    def per_example_sq(self, batch_size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def statistics(self, batch_size: int) -> None:
        per = self.per_example_sq(batch_size)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.last = (torch.stack(list(per.values())).sum(0), torch.nn.utils.get_total_norm(grads).square())

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> Validation:
        self.zero_grad()
        self.backward(x, y)
        per = {n: v.detach().double() for n, v in self.per_example_sq(x.shape[0]).items()}
        params = dict(self.model.named_parameters())
        big = sum(float(params[n].grad.double().square().sum()) for n in per if params[n].grad is not None)
        return Validation(per_example_sq=per, covered=sorted(per), big_sq=big, notes=list(self.notes))


class FuncMode(PeerMode):
    """torch.func: ``vmap(grad(loss of one example))`` materialises per-example gradients; their mean -> .grad."""

    name = "func"

    def setup(self) -> None:
        from torch.func import functional_call, grad, vmap

        model, wl = self.model, self.wl

        def loss_one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return wl.loss(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        self._per_example_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))
        self._sq: dict[str, torch.Tensor] = {}

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        grads = self._per_example_grads(params, x, y)
        self._sq = {}
        for n, p in self.model.named_parameters():
            g = grads[n]
            self._sq[n] = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).square()
            p.grad = g.mean(0)

    def per_example_sq(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self._sq


class BackpackMode(PeerMode):
    """BackPACK ``BatchL2Grad``: per-example squared norms of the shares of ``p.grad`` (so times B^2)."""

    name = "backpack"
    needs = ("backpack",)
    peer = "backpack-for-pytorch"

    def setup(self) -> None:
        from backpack import extend

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.model = extend(self.model)
            self.net = self.model
            self.lossfn = extend(nn.CrossEntropyLoss())
        self.notes += sorted({str(w.message)[:160] for w in caught})

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        loss = self.lossfn(*self.wl.flat(self.net(x), y))
        with backpack(BatchL2Grad()):
            loss.backward()

    def per_example_sq(self, batch_size: int) -> dict[str, torch.Tensor]:
        b2 = float(batch_size) ** 2
        out = {}
        for n, p in self.model.named_parameters():
            sq = getattr(p, "batch_l2", None)  # BackPACK's attribute; absent for layers it does not support
            if sq is not None:
                out[n] = sq * b2
        return out


class OpacusGhostMode(PeerMode):
    """Opacus ghost clipping, first backward only: ``GradSampleModuleFastGradientClipping`` leaves per-example
    gradient norms in ``p._norm_sample`` (of each example's own loss: ``loss_reduction="mean"`` rescales)."""

    name = "opacus_ghost"
    needs = ("opacus",)
    peer = "opacus"

    def setup(self) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        self.net = GradSampleModuleFastGradientClipping(
            self.model,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            max_grad_norm=1e9,
            use_ghost_clipping=True,
        )

    def zero_grad(self) -> None:
        self.net.zero_grad(set_to_none=True)

    def per_example_sq(self, batch_size: int) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.model.named_parameters():
            ns = getattr(p, "_norm_sample", None)
            if ns is not None:
                out[n] = ns.reshape(-1).square()
        return out


MODES: dict[str, type[Mode]] = {
    m.name: m
    for m in (
        Mode,
        NsExampleMode,
        NsExampleNoReadMode,
        NsStoreMode,
        PlainAccumMode,
        NsMicrobatchMode,
        NsNormMode,
        NsEvery10Mode,
        NsDisarmedMode,
        NsBudgetMode,
        NsSketchMode,
        NsMicrobatchEvery10Mode,
        BackpackMode,
        OpacusGhostMode,
        FuncMode,
    )
}
