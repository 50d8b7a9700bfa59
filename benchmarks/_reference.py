"""The exact reference every mode is checked against: float64 per-example gradients from torch.func.

At the initial parameters on batch 0 it keeps, per parameter tensor, each example's squared gradient norm, the
squared norm of the batch-mean gradient and of each micro-batch's mean gradient, so B_simple can be computed
exactly on any subset of parameters (the ones a mode covers) with either small-batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from _modes import Validation
from _workloads import N_MICRO, Workload

NORM_RTOL = 1e-4  # float32 per-example norms against float64
B_SIMPLE_RTOL = 1e-3  # one step's B_simple against the exact one on the same parameters


def two_batch_b_simple(mean_small_sq: float, big_sq: float, b_small: float, b_big: float) -> float:
    """McCandlish et al. 2018, App. A: ``tr(Sigma) / |G|^2`` from ``E|G_b|^2 = |G|^2 + tr(Sigma) / b`` at two ``b``."""
    trace_cov = (mean_small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    grad_sq = big_sq - trace_cov / b_big
    return trace_cov / grad_sq if grad_sq != 0 else math.nan


@dataclass
class Exact:
    per_example: dict[str, torch.Tensor]  # (B,) |g_i|^2 per parameter
    big: dict[str, float]  # |mean_i g_i|^2 per parameter
    micro: dict[str, torch.Tensor]  # (N_MICRO,) |mean over micro-batch j|^2 per parameter
    numel: dict[str, int]
    batch_size: int

    def coverage(self, names: list[str]) -> float:
        return sum(self.numel[n] for n in names) / sum(self.numel.values())

    def b_simple(self, names: list[str] | None = None, estimator: str = "per_example") -> float:
        names = list(self.per_example) if names is None else names
        big = sum(self.big[n] for n in names)
        b = self.batch_size
        if estimator == "micro":
            small = float(sum(self.micro[n] for n in names).mean())
            return two_batch_b_simple(small, big, b / N_MICRO, b)
        small = float(sum(self.per_example[n] for n in names).mean())
        return two_batch_b_simple(small, big, 1, b)


def exact_reference(wl: Workload, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Exact:
    from torch.func import functional_call, grad, vmap

    model = wl.make_model().double()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    params = {n: p.detach() for n, p in model.named_parameters()}
    xd = x.double() if wl.float_input else x

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return wl.loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, xd, y)
    b = x.shape[0]
    per, big, micro = {}, {}, {}
    for n, g in grads.items():
        flat = g.reshape(b, -1)
        per[n] = flat.square().sum(1)
        big[n] = float(flat.mean(0).square().sum())
        micro[n] = torch.stack([c.mean(0).square().sum() for c in flat.chunk(N_MICRO)])
    return Exact(per, big, micro, {n: p.numel() for n, p in params.items()}, b)


def evaluate(val: Validation, ref: Exact) -> dict:
    """Compare one mode's ``Validation`` with the exact reference; ``ok`` is False when a check fails."""
    names = val.covered if val.covered is not None else list(ref.per_example)
    out: dict = {
        "estimator": val.estimator,
        "coverage": val.coverage if val.coverage is not None else ref.coverage(names),
        "covered_params": len(names),
        "exact_b_simple_on_covered": ref.b_simple(names, val.estimator),
        "ok": True,
        "failed_checks": [],
    }
    if val.per_example_sq is not None:
        mine = sum(val.per_example_sq.values())
        exact = sum(ref.per_example[n] for n in val.per_example_sq)
        rel = float(((mine - exact).abs() / exact).max())
        out["norm_max_rel_diff"] = rel
        if not rel <= NORM_RTOL:
            out["failed_checks"].append(f"per-example norms differ from exact by {rel:.2e} > {NORM_RTOL:g}")
        if val.b_simple is None and val.big_sq is not None:
            b = ref.batch_size
            val.b_simple = two_batch_b_simple(float(mine.mean()), val.big_sq, 1, b)
    if val.b_simple is not None:
        out["b_simple"] = val.b_simple
        rel = abs(val.b_simple - out["exact_b_simple_on_covered"]) / abs(out["exact_b_simple_on_covered"])
        out["b_simple_rel_diff"] = rel
        if not rel <= B_SIMPLE_RTOL:
            out["failed_checks"].append(f"B_simple differs from exact by {rel:.2e} > {B_SIMPLE_RTOL:g}")
    out["ok"] = not out["failed_checks"]
    return out
