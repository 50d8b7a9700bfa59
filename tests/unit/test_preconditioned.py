"""The Adam-preconditioned noise scale (``GNSMonitor(precondition=optimizer)``), held to a float64 reference.

The reference takes Adam's divisor from the optimizer itself: after ``optimizer.step()`` its state holds the
``v_t`` (or the running maximum, with amsgrad) that the step divided by, so ``d = sqrt(v_t / (1 - beta2^t)) + eps``
is known without repeating the library's formula.  Each micro-batch's gradient is taken separately by autograd
and the two-batch estimator is written out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import noisescale as ns
from noisescale.controllers import ControllerConfig
from noisescale.errors import ConfigError
from noisescale.preconditioner import STEPPED_BETWEEN, WARMUP_STEPS
from noisescale.store import RunReader

K, B = 4, 32
STEPS = WARMUP_STEPS + 4

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05),
    "amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable, so the signal is not zero
    return x, y


def _share(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """A micro-batch's share of ``p.grad`` (its loss over ``K``), through copies the monitor's hooks never see."""
    copies = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = F.cross_entropy(torch.func.functional_call(model, copies, (x,)), y) / K
    return list(torch.autograd.grad(loss, list(copies.values())))


def _adam_divisor(opt: torch.optim.Optimizer, p: nn.Parameter, beta2: float | None = None) -> torch.Tensor:
    """Adam's divisor of the step just taken, from its state (``beta2``: the one the step used, if not the group's)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state[p]
    beta2 = group["betas"][1] if beta2 is None else beta2
    eps, t = group["eps"], float(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    if isinstance(opt, torch.optim.RAdam):  # its adaptive term: sqrt(1 - beta2^t) / (sqrt(v) + eps)
        return (v.sqrt() + eps) / math.sqrt(1 - beta2**t)
    return (v / (1 - beta2**t)).sqrt() + eps


def _reference_raw(micro: list[list[torch.Tensor]], grads: list[torch.Tensor], divisors: list[torch.Tensor]):
    """The two-batch estimator on gradients divided by ``d``, written out (equal micro-batches of b examples)."""
    b = B // K
    small = sum(float(((K * c / d) ** 2).sum()) for shares in micro for c, d in zip(shares, divisors, strict=True))
    big = sum(float(((g / d) ** 2).sum()) for g, d in zip(grads, divisors, strict=True))
    mean_small = small / K
    grad_sq = (B * big - b * mean_small) / (B - b)
    trace = (mean_small - big) / (1 / b - 1 / B)
    return grad_sq, trace


def _train(
    opt_name: str | Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    steps: int = STEPS,
    *,
    between: Callable[[ns.Measurement], object] | None = None,
    beta2: float | None = None,
    **monitor_kwargs,
):
    """``steps`` steps of ``K`` micro-batches: each step's measurement, micro-batch shares, gradient and divisors.

    ``between`` runs after ``monitor.step()`` and before ``optimizer.step()`` (a controller); ``beta2`` is the one
    the optimizer's steps use when it is not the group's.
    """
    model = _model()
    params = list(model.parameters())
    opt = (OPTIMIZERS[opt_name] if isinstance(opt_name, str) else opt_name)(params)
    monitor = ns.GNSMonitor(model, "microbatch", precondition=opt, **monitor_kwargs)
    out = []
    for step in range(steps):
        x, y = _batch(step)
        micro = []
        for xb, yb in zip(x.chunk(K), y.chunk(K), strict=True):
            micro.append(_share(model, xb, yb))
            (F.cross_entropy(model(xb), yb) / K).backward()
        grads = [p.grad.detach().clone() for p in params]
        m = monitor.step(B)
        if between is not None:
            between(m)
        opt.step()
        opt.zero_grad()
        out.append((m, micro, grads, [_adam_divisor(opt, p, beta2) for p in params]))
    monitor.close()
    return out


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_raw_estimate_matches_the_reference_with_adams_own_divisor(opt_name):
    records = _train(opt_name)
    for m, micro, grads, divisors in records[WARMUP_STEPS:]:
        pre = m.preconditioned
        assert pre is not None and pre.status == "ok", pre.undefined_reason if pre is not None else None
        grad_sq, trace = _reference_raw(micro, grads, divisors)
        assert math.isclose(pre.grad_sq_raw, grad_sq, rel_tol=1e-9), (pre.grad_sq_raw, grad_sq)
        assert math.isclose(pre.trace_cov_raw, trace, rel_tol=1e-9), (pre.trace_cov_raw, trace)
        assert m.b_precond == pre.b_simple and m.b_precond_low == pre.b_simple_low
        assert m.b_precond_high == pre.b_simple_high and m.b_precond_raw == pre.b_simple_raw


def test_the_preconditioned_value_differs_from_the_plain_one():
    # The check above cannot pass by returning the plain sums: Adam's divisor changes the estimate.
    m = _train("adam")[-1][0]
    assert m.b_precond is not None and m.b_simple is not None
    assert not math.isclose(m.preconditioned.trace_cov_raw, m.trace_cov_raw, rel_tol=1e-3)


def test_the_first_optimizer_steps_are_undefined_with_the_reason():
    records = _train("adam")
    for m, *_ in records[:WARMUP_STEPS]:
        assert m.status == "ok" or m.step == 1  # the plain estimate is unaffected
        assert m.preconditioned.status == "undefined"
        assert m.b_precond is None
        assert f"first {WARMUP_STEPS} steps" in m.preconditioned.undefined_reason
    assert records[WARMUP_STEPS][0].preconditioned.status == "ok"


def test_per_layer_values_sum_to_the_whole_model_components():
    m = _train("adamw")[-1][0]
    layers = m.preconditioned.layers
    assert set(layers) == set(m.layers)
    assert math.isclose(sum(v.trace_cov_raw for v in layers.values()), m.preconditioned.trace_cov_raw, rel_tol=1e-9)


def test_without_precondition_the_attribute_is_missing_and_names_the_option():
    model = _model()
    monitor = ns.GNSMonitor(model, "microbatch")
    x, y = _batch(0)
    for xb, yb in zip(x.chunk(K), y.chunk(K), strict=True):
        F.cross_entropy(model(xb), yb).backward()
    m = monitor.step(B)
    assert m.preconditioned is None and not hasattr(m, "b_precond")
    with pytest.raises(AttributeError, match="precondition=optimizer"):
        _ = m.b_precond
    assert m.companion_metrics() == {}


def test_the_controller_follows_b_precond():
    records = _train("adam", steps=WARMUP_STEPS + 2)
    cfg = ControllerConfig(policy="gns", min_batch=8, max_batch=4096, signal="b_precond")
    state = cfg.init()
    decision, state = cfg.update(records[-1][0], state)
    assert decision.signal == records[-1][0].b_precond
    assert "b_precond" in decision.reason


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "SGD does not keep"),
        (lambda m: torch.optim.Adamax(m.parameters()), "Adamax does not keep"),
        (lambda m: torch.optim.Adam(list(m.parameters())[:2]), "not in the optimizer"),
        (lambda m: "adam", "Adam-family optimizer"),
    ],
)
def test_bad_optimizers_are_refused_at_construction(make, match):
    model = _model()
    with pytest.raises(ConfigError, match=match):
        ns.GNSMonitor(model, "microbatch", precondition=make(model))


def test_the_example_source_is_refused_by_name_and_explained_under_auto():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ConfigError, match="per-example norms are not preconditioned"):
        ns.GNSMonitor(model, "example", precondition=opt)
    monitor = ns.GNSMonitor(model, "auto", precondition=opt)
    for step in range(WARMUP_STEPS + 1):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()  # one backward pass: auto measures per example
        m = monitor.step(B)
        opt.step()
        opt.zero_grad()
    assert m.source == "example" and m.status == "ok"
    assert m.preconditioned.status == "undefined" and "micro-batches or ranks" in m.preconditioned.undefined_reason


def test_unequal_micro_batches_are_undefined_with_the_reason():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    monitor = ns.GNSMonitor(model, "microbatch", precondition=opt)
    sizes = [4, 12, 16]
    for step in range(WARMUP_STEPS + 1):
        x, y = _batch(step)
        for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
            F.cross_entropy(model(xb), yb, reduction="sum").backward()
        m = monitor.step(B, micro_batch_sizes=sizes)
        opt.step()
        opt.zero_grad()
    assert m.grad_sq_raw is not None  # the plain estimate is made
    assert m.preconditioned.status == "undefined" and "equal size" in m.preconditioned.undefined_reason


def test_an_optimizer_step_inside_a_step_is_caught():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    monitor = ns.GNSMonitor(model, "microbatch", precondition=opt)
    for step in range(WARMUP_STEPS + 1):
        x, y = _batch(step)
        for i, (xb, yb) in enumerate(zip(x.chunk(K), y.chunk(K), strict=True)):
            F.cross_entropy(model(xb), yb).backward()
            if step == WARMUP_STEPS and i == 1:
                opt.step()  # Adam's state changes between this step's backward passes
        m = monitor.step(B)
        opt.step()
        opt.zero_grad()
    assert m.preconditioned.undefined_reason == STEPPED_BETWEEN


def test_state_dict_resumes_the_preconditioned_averages_bit_for_bit():
    full = [m for m, *_ in _train("adam", steps=STEPS + 3)]

    model = _model()
    params = list(model.parameters())
    opt = OPTIMIZERS["adam"](params)
    monitor = ns.GNSMonitor(model, "microbatch", precondition=opt)

    def run(steps, mon, model, opt):
        out = []
        for step in steps:
            x, y = _batch(step)
            for xb, yb in zip(x.chunk(K), y.chunk(K), strict=True):
                (F.cross_entropy(model(xb), yb) / K).backward()
            out.append(mon.step(B))
            opt.step()
            opt.zero_grad()
        return out

    cut = STEPS - 1
    run(range(cut), monitor, model, opt)
    saved = (monitor.state_dict(), model.state_dict(), opt.state_dict())
    monitor.close()

    model2 = _model()
    opt2 = OPTIMIZERS["adam"](list(model2.parameters()))
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    monitor2 = ns.GNSMonitor(model2, "microbatch", precondition=opt2)
    monitor2.load_state_dict(saved[0])
    resumed = run(range(cut, STEPS + 3), monitor2, model2, opt2)
    for a, b in zip(full[cut:], resumed, strict=True):
        assert a.b_precond == b.b_precond and a.b_precond_high == b.b_precond_high
        assert a.preconditioned.grad_sq == b.preconditioned.grad_sq


def test_unmeasured_steps_carry_the_last_preconditioned_value():
    records = _train("adam", steps=STEPS + 1, every=2)
    measured, unmeasured = records[-2][0], records[-1][0]
    if measured.status == "unmeasured":
        measured, unmeasured = records[-3][0], records[-2][0]
    assert unmeasured.status == "unmeasured" and unmeasured.preconditioned.status == "unmeasured"
    assert unmeasured.b_precond == measured.b_precond and unmeasured.b_precond_raw is None


def _run(model, opt, monitor, steps: int = STEPS, between=None) -> ns.Measurement:
    """``steps`` plain steps of ``K`` micro-batches; the last measurement."""
    for step in range(steps):
        x, y = _batch(step)
        for xb, yb in zip(x.chunk(K), y.chunk(K), strict=True):
            (F.cross_entropy(model(xb), yb) / K).backward()
        m = monitor.step(B)
        if between is not None:
            between(m)
        opt.step()
        opt.zero_grad()
    return m


def _recorded(tmp_path) -> tuple[ns.Measurement, RunReader]:
    """``STEPS`` steps with Adam into a run store: the last measurement and the run read back."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with ns.Run("precond", dir=tmp_path) as run:
        monitor = ns.GNSMonitor(model, "microbatch", precondition=opt, run=run)
        last = _run(model, opt, monitor)
        monitor.close()
    return last, RunReader(run.path)


def test_a_run_store_receives_it_as_metrics(tmp_path):
    last, reader = _recorded(tmp_path)
    series = reader.metric("b_precond")
    assert series.step[-1] == last.step and series.value[-1] == pytest.approx(last.b_precond, rel=1e-12)
    assert series.step[0] == 1 and series.value[0] is None  # stored, undefined, while Adam warms up
    assert reader.metric("b_precond_high").value[-1] == pytest.approx(last.b_precond_high, rel=1e-12)


def test_show_summarises_it(tmp_path):
    from noisescale.cli.show import text_summary
    from noisescale.store.summary import summarize

    last, reader = _recorded(tmp_path)
    s = summarize(reader)
    assert s["b_precond"]["last"] == pytest.approx(last.b_precond, rel=1e-12) and s["b_precond"]["step"] == STEPS
    assert "B_precond " in text_summary(s, {})


class _QuantisedStateAdam(torch.optim.Optimizer):
    """An Adam that keeps its moments under other names (as 8-bit Adams do): there is no exp_avg_sq to read."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"], st["state1"], st["state2"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["state1"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["state2"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["state2"] / (1 - b2 ** st["step"])).sqrt() + group["eps"]
                p.addcdiv_(st["state1"] / (1 - b1 ** st["step"]), denom, value=-group["lr"])


def test_an_optimizer_without_adams_state_is_undefined_not_wrong():
    model = _model()
    opt = _QuantisedStateAdam(model.parameters())
    m = _run(model, opt, ns.GNSMonitor(model, "microbatch", precondition=opt))
    assert m.status == "ok"
    assert m.preconditioned.status == "undefined" and "no exp_avg_sq" in m.preconditioned.undefined_reason


def test_keep_horizons_beta2_is_the_divisor_adam_uses():
    # The controller sets beta2 = 0.999 ** (B / B0) only while optimizer.step() runs; the divisor must use it.
    controllers = []

    def adam_with_controller(params):
        opt = torch.optim.Adam(params, lr=1e-2)
        controllers.append(
            ns.BatchSizeController(
                "constant", batch_size=B, base_batch=B // 4, lr_rule="none", optimizer=opt, keep_horizons=("beta2",)
            )
        )
        return opt

    records = _train(adam_with_controller, between=lambda m: controllers[0].step(m), beta2=0.999**4)
    assert controllers[0].optimizer.param_groups[0]["betas"][1] == 0.999  # the user's value is back after steps
    for m, micro, grads, divisors in records[WARMUP_STEPS:]:
        grad_sq, trace = _reference_raw(micro, grads, divisors)
        assert math.isclose(m.preconditioned.grad_sq_raw, grad_sq, rel_tol=1e-9)
        assert math.isclose(m.preconditioned.trace_cov_raw, trace, rel_tol=1e-9)
    controllers[0].close()


def test_keep_horizons_with_coupled_decay_is_undefined():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)
    ctrl = ns.BatchSizeController(
        "constant", batch_size=B, base_batch=B // 4, lr_rule="none", optimizer=opt, keep_horizons=("weight_decay",)
    )
    m = _run(model, opt, ns.GNSMonitor(model, "microbatch", precondition=opt), between=ctrl.step)
    assert "weight decay" in m.preconditioned.undefined_reason
    ctrl.close()


def test_auto_settling_on_the_example_source_frees_the_buffers():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    monitor = ns.GNSMonitor(model, "auto", precondition=opt)
    x, y = _batch(0)
    for xb, yb in zip(x.chunk(K), y.chunk(K), strict=True):  # the first step has micro-batches: buffers filled
        F.cross_entropy(model(xb), yb).backward()
    monitor.step(B)
    assert monitor.source == "microbatch" and monitor._pre.preconditioner.stopped is None

    model = _model()
    opt = torch.optim.Adam(model.parameters())
    monitor = ns.GNSMonitor(model, "auto", precondition=opt)
    F.cross_entropy(model(x), y).backward()
    monitor.step(B)
    pre = monitor._pre.preconditioner
    assert monitor.source == "example" and pre.stopped is not None and pre._squares == {}
