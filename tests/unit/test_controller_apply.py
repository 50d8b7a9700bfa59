"""Applying decisions: the learning rate around optimizer.step() only, horizons, sampler, events and metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import noisescale as ns
from noisescale.controllers import ExampleClock, Stall
from noisescale.errors import ConfigError


@dataclass
class M:
    step: int
    examples: int
    b_simple: float | None
    b_simple_low: float | None = None
    b_simple_high: float | None = None
    status: str = "ok"


class Recorder:
    """A run stand-in: records events and metrics."""

    def __init__(self):
        self.events, self.metrics = [], []

    def event(self, kind, message="", *, step=None, data=None):
        self.events.append((kind, message, step, data))

    def log(self, step, metrics):
        self.metrics.append((step, dict(metrics)))


def _param_and_grad(value=1.0, grad=0.5):
    p = torch.nn.Parameter(torch.full((3,), value))
    p.grad = torch.full((3,), grad)
    return p


def test_lr_is_scaled_for_the_step_only_and_composes_with_a_scheduler():
    p = _param_and_grad()
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ctrl = ns.BatchSizeController("constant", batch_size=64, base_batch=32, lr_rule="linear", optimizer=opt)
    assert ctrl.lr_scale == 2.0 and ctrl.lr == pytest.approx(0.2)
    ctrl.step(M(1, 64, None))
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 1.0 - 0.2 * 0.5))  # lr 0.1 x 2
    assert opt.param_groups[0]["lr"] == 0.1  # the user's value is back
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    ctrl.step(M(2, 128, None))
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9 - 0.1 * 0.5))  # the scheduler's 0.05 x 2
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)  # a checkpoint holds the user's lr
    ctrl.close()
    opt.step()  # hooks removed: the plain learning rate
    assert torch.allclose(p.detach(), torch.full((3,), 0.85 - 0.05 * 0.5))


def test_decision_lr_applies_to_the_measured_gradient_then_the_new_batch():
    p = _param_and_grad(grad=1.0)
    opt = torch.optim.SGD([p], lr=1.0)
    run = Recorder()
    ctrl = ns.BatchSizeController(
        "gns", min_batch=32, max_batch=256, quantize="pow2", use_band=False, lr_rule="linear", optimizer=opt, run=run
    )
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))  # runs after the controller's
    for step, b in enumerate([70.0, 70.0, 70.0], start=1):
        d = ctrl.step(M(step, 32 * step, b))
        opt.step()
    assert used == [1.0, 2.0, 2.0]  # step 1 ran at 32 and decided 64 (nearest power of two to 70), kept after
    assert d.batch_size == 64 and ctrl.batch_size == 64
    lrs = [(s, m["lr"]) for s, m in run.metrics if "lr" in m]
    assert lrs == [(1, 1.0), (2, 2.0), (3, 2.0)]
    assert [(s, m["lr_scale"]) for s, m in run.metrics if "lr_scale" in m] == [(1, 1.0), (2, 2.0), (3, 2.0)]


def test_each_change_is_an_event_with_before_and_after():
    run = Recorder()
    ctrl = ns.BatchSizeController(
        "gns", min_batch=32, max_batch=256, micro_batch=16, use_band=False, lr_rule="sqrt", base_lr=0.01, run=run
    )
    ctrl.step(M(1, 32, 20.0))  # held: no event
    ctrl.step(M(2, 64, 100.0, 90.0, 110.0))
    assert len(run.events) == 1
    kind, message, step, data = run.events[0]
    assert (kind, step) == ("controller", 2) and "batch 32 -> 64" in message
    assert data["policy"] == "gns"
    assert data["before"] == {"batch_size": 32, "accumulation": 2, "lr_scale": 1.0}
    assert data["after"] == {"batch_size": 64, "accumulation": 4, "lr_scale": pytest.approx(math.sqrt(2))}
    assert (data["b_simple"], data["b_simple_low"], data["b_simple_high"]) == (100.0, 90.0, 110.0)
    assert ctrl.accumulation == 4  # for the next step
    assert ctrl.lr == 0.01  # the coming optimizer.step() is still for the gradient measured at 32
    metrics = dict(run.metrics)
    assert metrics[1] == {"lr_scale": 1.0, "accumulation": 2.0, "lr": 0.01}
    assert metrics[2]["accumulation"] == 2.0  # the step measured still ran with 2 micro-batches


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_horizons_kept_in_examples_during_the_step_only(opt_name):
    p = _param_and_grad()
    if opt_name == "sgd":
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    ctrl = ns.BatchSizeController(
        "constant",
        batch_size=128,
        base_batch=32,
        lr_rule="sqrt",
        optimizer=opt,
        keep_horizons=("momentum", "beta2", "weight_decay") if opt_name == "adamw" else ("momentum", "weight_decay"),
    )
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(o.param_groups[0]))
    before = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    ctrl.step(M(1, 128, None))
    opt.step()
    assert seen["lr"] == pytest.approx(0.1 * 2.0)  # sqrt(128 / 32)
    if opt_name == "sgd":
        assert seen["momentum"] == pytest.approx(0.9**4)
    else:
        assert seen["betas"] == pytest.approx((0.9**4, 0.99**4))
    assert seen["weight_decay"] == pytest.approx(0.01 * 4 / 2)  # decay per example unchanged: lr x wd / B
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == before
    assert "momentum_buffer" in opt.state[p] or "exp_avg" in opt.state[p]  # optimizer state kept, not wiped


def test_a_step_that_raises_does_not_leave_the_scaled_lr_behind():
    p = _param_and_grad()
    opt = torch.optim.SGD([p], lr=0.1)
    ctrl = ns.BatchSizeController("constant", batch_size=64, base_batch=32, lr_rule="linear", optimizer=opt)

    def boom():
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError):
        opt.step(boom)
    assert opt.param_groups[0]["lr"] == 0.2  # left by the failed step ...
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1  # ... and put back by the next one
    assert torch.allclose(p.detach(), torch.full((3,), 1.0 - 0.2 * 0.5))
    ctrl.close()


def test_sampler_and_clock_follow_decisions():
    sampler = ns.AdaptiveBatchSampler(1000, 32, seed=1)
    clock = ExampleClock()
    ctrl = ns.BatchSizeController("gns", min_batch=32, max_batch=512, use_band=False, sampler=sampler, clock=clock)
    assert sampler.batch_size == 32
    idx = sampler.next_batch()
    ctrl.step(M(1, len(idx), 100.0))
    assert sampler.batch_size == 64 and clock.examples == 32 and clock.step == 1
    assert len(sampler.next_batch()) == 64


def test_state_dict_round_trip_and_mismatches():
    sampler = ns.AdaptiveBatchSampler(1000, 32)
    kw = {"min_batch": 32, "max_batch": 512, "use_band": False, "lr_rule": "linear", "base_lr": 0.1}
    ctrl = ns.BatchSizeController("gns", sampler=sampler, **kw)
    for step in range(1, 4):
        ctrl.step(M(step, 32 * step, 300.0))
    saved = ctrl.state_dict()
    other_sampler = ns.AdaptiveBatchSampler(1000, 32)
    other = ns.BatchSizeController("gns", sampler=other_sampler, **kw)
    other.load_state_dict(saved)
    assert other.state == ctrl.state and other.decision == ctrl.decision
    assert other_sampler.batch_size == ctrl.batch_size == 256
    assert other.lr_scale == ctrl.decision.next_lr_scale == 8.0  # what the next step at 256 will use
    with pytest.raises(ConfigError, match="policy"):
        ns.BatchSizeController("constant", batch_size=32).load_state_dict(saved)
    with pytest.raises(ConfigError, match="saved batch_size=256"):
        ns.BatchSizeController("gns", min_batch=32, max_batch=128).load_state_dict(saved)


def test_stall_response_through_the_wrapper_needs_the_loss():
    ctrl = ns.BatchSizeController("gns", min_batch=16, max_batch=64, stall=Stall(patience=32, duration=32))
    with pytest.raises(ConfigError, match="loss"):
        ctrl.step(M(1, 16, 10.0))
    ctrl.step(M(1, 16, 10.0), loss=torch.tensor(0.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_rule": "linear"}, "scales a learning rate, but none was given"),
        ({"lr_rule": "sqrt", "base_lr": -1.0}, "base_lr must be a positive"),
        ({"keep_horizons": ("momentum",)}, "pass optimizer="),
        ({"keep_horizons": ("momentum",), "optimizer": "sgd"}, "has momentum or betas"),
        ({"keep_horizons": ("entropy",), "optimizer": "sgd"}, "unknown horizon"),
        ({"optimizer": "sgd", "base_lr": 0.1}, "not both"),
        ({"sampler": "small"}, "larger than the sampler's dataset"),
        ({"sampler": "two-ranks", "world_size": 4}, "shards over 2 ranks"),
        ({"run": object()}, "must have an event"),
        ({"clock": 3}, "ExampleClock"),
        ({"stall": {"patience": 1}}, "Stall"),
    ],
)
def test_bad_wrapper_configuration(kwargs, match):
    if kwargs.get("optimizer") == "sgd":
        kwargs["optimizer"] = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    if kwargs.get("sampler") == "small":
        kwargs["sampler"] = ns.AdaptiveBatchSampler(100, 32)
    if kwargs.get("sampler") == "two-ranks":
        kwargs["sampler"] = ns.AdaptiveBatchSampler(1000, 32, num_replicas=2, rank=0)
    with pytest.raises(ConfigError, match=match):
        ns.BatchSizeController("gns", min_batch=32, max_batch=512, **kwargs)


def test_a_decision_made_inside_the_steps_closure_applies_to_that_step():
    """Lightning runs backward (and so the measurement and the decision) inside optimizer.step(closure), after the
    step's pre-hook: the multiplier decided there still scales that step, and the lr logged is the one it used."""
    p = _param_and_grad(grad=0.0)
    opt = torch.optim.SGD([p], lr=1.0)
    run = Recorder()
    ctrl = ns.BatchSizeController("gns", min_batch=32, max_batch=256, lr_rule="adascale", optimizer=opt, run=run)

    def closure(step: int, b: float) -> torch.Tensor:
        p.grad = torch.ones(3)
        ctrl.step(M(step, 32 * step, b))
        return torch.zeros(())

    opt.step(lambda: closure(1, 32.0))  # adascale at the base batch: 1; the target 32 holds
    assert torch.allclose(p.detach(), torch.zeros(3))
    ctrl.step(M(2, 64, 1e9))  # decides 64; the next gradient is measured at 64
    opt.step(lambda: closure(3, 1e9))  # measured at 64 with noise dominating: the gain is 64 / 32
    assert torch.allclose(p.detach(), torch.full((3,), -2.0))
    assert opt.param_groups[0]["lr"] == 1.0
    assert [(s, m["lr"]) for s, m in run.metrics if "lr" in m] == [(1, 1.0), (3, pytest.approx(2.0))]


def test_an_optimizer_attached_later():
    p = _param_and_grad()
    opt = torch.optim.AdamW([p], lr=0.1)
    ctrl = ns.BatchSizeController("constant", batch_size=64, base_batch=32, lr_rule="linear", optimizer="later")
    assert ctrl.optimizer is None and ctrl.awaits_optimizer
    with pytest.raises(ConfigError, match="attach"):
        ctrl.step(M(1, 64, None))
    run = Recorder()
    ctrl.attach(opt, run=run)
    assert ctrl.optimizer is opt and ctrl.lr == pytest.approx(0.2)
    ctrl.step(M(1, 64, None))
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    opt.step()
    assert seen == [pytest.approx(0.2)] and run.metrics[-1] == (1, {"lr": pytest.approx(0.2)})
    with pytest.raises(ConfigError, match="optimizer='later'"):
        ctrl.attach(opt)
    with pytest.raises(ConfigError, match="already has a run"):
        ctrl.attach(run=Recorder())


def test_optimizer_later_is_checked_at_construction():
    with pytest.raises(ConfigError, match="not both"):
        ns.BatchSizeController("constant", batch_size=32, lr_rule="linear", optimizer="later", base_lr=0.1)
    with pytest.raises(ConfigError, match="'later'"):
        ns.BatchSizeController("constant", batch_size=32, optimizer="sgd")
    with pytest.raises(ConfigError, match="unknown horizon"):
        ns.BatchSizeController("constant", batch_size=32, optimizer="later", keep_horizons=("beta3",))
    ctrl = ns.BatchSizeController("constant", batch_size=32, optimizer="later", keep_horizons=("beta2",))
    with pytest.raises(ConfigError, match="beta2"):
        ctrl.attach(torch.optim.SGD([_param_and_grad()], lr=0.1))  # SGD has no betas
