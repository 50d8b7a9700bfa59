"""Slow, obviously correct references for the collectors: one autograd call per example or micro-batch, float64.

Nothing here is clever on purpose: each function copies the model to float64 and differentiates a loss that
involves only the examples in question, so the fast paths in ``noisescale.collectors`` are checked against
plain ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "PerExampleLoss",
    "double_model",
    "microbatch_mean_grad_sq_norms",
    "per_example_sq_norms",
    "torch_func_sq_norms",
]

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(output, target) -> (B,)`` loss of each example."""


def double_model(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` (same values), without noisescale's hooks.

    A deep copy copies a module's hooks, and with a collector's bound methods the collector itself: the reference
    would run a copy of the code it checks (with the state it had), not plain autograd.
    """
    ref = copy.deepcopy(model).to(torch.float64)
    for module in ref.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_hooks):
            for key in [k for k, fn in hooks.items() if _from_noisescale(fn)]:
                del hooks[key]
    return ref


def _from_noisescale(fn: object) -> bool:
    """Whether a hook is noisescale's (a function, a bound method or a ``functools.partial`` of one)."""
    fn = getattr(fn, "func", fn)
    fn = getattr(fn, "__func__", fn)
    return str(getattr(fn, "__module__", "")).startswith("noisescale")


def _double(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t


def _sq_norm(g: torch.Tensor | None) -> torch.Tensor:
    if g is None:
        return torch.zeros((), dtype=torch.float64)
    if g.is_sparse:
        g = g.to_dense()
    return g.to(torch.float64).square().sum()


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_example_sq_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerExampleLoss, *, batch_dim: int = 0
) -> dict[str, torch.Tensor]:
    """``|d loss_fn(model(x_i), y_i) / d p|^2`` for every example ``i`` and trainable parameter ``p``.

    Args:
        batch_dim: the dimension of ``x`` and ``y`` that holds the examples (1 for positions-first inputs).

    Returns:
        ``{param_name: (B,) float64}``, in ``model.named_parameters()`` order.
    """
    ref = double_model(model)
    params = _trainable(ref)
    rows: list[list[torch.Tensor]] = []
    for i in range(x.shape[batch_dim]):
        xi, yi = x.narrow(batch_dim, i, 1), y.narrow(batch_dim, i, 1)
        loss = loss_fn(ref(_double(xi)), _double(yi)).sum()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        rows.append([_sq_norm(g) for g in grads])
    return {name: torch.stack([r[j] for r in rows]) for j, (name, _) in enumerate(params)}


def microbatch_mean_grad_sq_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerExampleLoss, sizes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """``|mean_{i in j} grad_i|^2`` for each consecutive micro-batch ``j`` of ``sizes`` and trainable parameter.

    Returns:
        ``{param_name: (k,) float64}``.
    """
    ref = double_model(model)
    params = _trainable(ref)
    rows: list[list[torch.Tensor]] = []
    for xj, yj in zip(torch.split(x, list(sizes)), torch.split(y, list(sizes)), strict=True):
        loss = loss_fn(ref(_double(xj)), _double(yj)).mean()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        rows.append([_sq_norm(g) for g in grads])
    return {name: torch.stack([r[j] for r in rows]) for j, (name, _) in enumerate(params)}


def torch_func_sq_norms(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    loss_of: Callable[[object], torch.Tensor] = lambda out: out.loss,  # type: ignore[attr-defined]
) -> dict[str, torch.Tensor]:
    """Each example's share of the batch loss's squared gradient norm, per parameter, one example at a time.

    ``inputs`` are keyword arguments of ``model`` whose first dimension is the batch; ``loss_of(output)`` is the
    example's mean loss (a Hugging Face model's ``.loss``).  The batch loss is the mean over examples (equal
    numbers of tokens), so example ``i``'s share of ``p.grad`` is its gradient divided by ``B``.  Each example runs
    alone through ``torch.func.functional_call`` on detached copies of the parameters (no hook of the model sees
    it), in a plain loop: models whose forward branches on the data (Hugging Face's packed-sequence check) cannot
    run under ``vmap``.

    Returns:
        ``{param_name: (B,) float64}`` for every trainable parameter.
    """
    from torch.func import functional_call

    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    b = next(iter(inputs.values())).shape[0]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(b):
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
        kwargs = {n: t[i : i + 1] for n, t in inputs.items()}
        loss = loss_of(functional_call(model, ({**params, **frozen}, buffers), args=(), kwargs=kwargs))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            rows[n].append(torch.zeros((), dtype=torch.float64) if g is None else g.to(torch.float64).square().sum())
    return {n: torch.stack(v) / b**2 for n, v in rows.items()}
