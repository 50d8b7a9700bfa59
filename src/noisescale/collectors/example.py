"""Per-example statistics: squared gradient norms of each example, from module hooks.

Each layer with a registered norm rule gets one forward hook.  When the layer runs with autograd on, the hook
registers a pre-hook on the autograd node that produced the layer's output; in the backward pass that hook
receives the output gradient and the layer's rule turns ``(inputs, grad_output)`` into per-example squared
norms of each parameter's gradient.  They are summed over examples and layers once per step in ``collect``,
because the two-batch estimator needs only ``sum_i |g_i|^2`` (McCandlish et al. 2018, App. A with small batches
of one example).

Needs only activations and output gradients, never ``p.grad``, so it also works on sharded parameters.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from noisescale.collectors import builtin  # noqa: F401  (registers the built-in rules, hooks and ties)
from noisescale.collectors.base import AnyRank, BackwardWatch, HookOwner
from noisescale.collectors.example_plan import ExamplePlan, RuleLayer, Scope, plan_example_statistics
from noisescale.collectors.rules.linear import GramCache, use_gram_cache
from noisescale.collectors.rules.registry import ForwardCheck, NormRule, TiedWeights
from noisescale.collectors.saved_inputs import SavedInputs, keep_inputs
from noisescale.device_index import DeviceIndex
from noisescale.errors import FALLBACK_HINT, SharedParameterError, StepError, UnsupportedLayerError
from noisescale.grad_norms import dense_values
from noisescale.stats import ParamSums, SmallBatchStats

__all__ = ["ExampleCollector", "Policy", "Scope"]

Policy = Literal["error", "warn", "ignore"]


@dataclass
class _Layer:
    """A measured module's rule, slots and what its first call must still prove."""

    name: str
    rule: NormRule
    slots: dict[str, int]
    tie: TiedWeights | None
    checks: tuple[ForwardCheck, ...]


class ExampleCollector(HookOwner):
    """Per-example squared gradient norms through the rule registry.

    Args:
        model: the model whose layers are hooked.
        on_unsupported: what to do with trainable parameters that no rule covers (a layer without a rule, or a
            parameter tied between layers other than an ``nn.Embedding`` and its ``nn.Linear`` output head,
            which is measured exactly): ``"error"`` raises at construction, ``"warn"`` warns once and leaves
            them out, ``"ignore"`` leaves them out silently.  Left-out parameters are excluded from the big-batch
            norm as well, so the estimate stays unbiased on the parameters it covers; see ``coverage``.
        scope: ``"all"`` measures every supported layer; ``"norm"`` only normalisation layers (LayerNorm,
            RMSNorm, ...), the cheap proxy of Gray et al. 2024.
        keep_per_example: also keep the per-example vectors (for tests and diagnostics; costs memory).
        watch: told of every backward pass the hooks see (``BackwardWatch``).

    Raises:
        UnsupportedLayerError: with ``on_unsupported="error"``, for a trainable layer that has no rule.
        SharedParameterError: with ``on_unsupported="error"``, for a parameter used by two layers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        on_unsupported: Policy = "error",
        scope: Scope = "all",
        keep_per_example: bool = False,
        watch: BackwardWatch | None = None,
    ) -> None:
        super().__init__(watch)
        self.keep_per_example = keep_per_example
        plan = plan_example_statistics(model, scope)
        _apply_policy(plan, on_unsupported)
        if scope == "norm" and not plan.params:
            raise UnsupportedLayerError(
                "scope='norm' found no trainable normalisation layer (LayerNorm, RMSNorm, ...) in the model; "
                "use scope='all'"
            )
        self.plan = plan
        self.params: list[tuple[str, nn.Parameter]] = list(plan.params)
        self.coverage = plan.coverage
        self.attention_params = set(plan.hooked_params)  # measured by a layer's own hooks, from inside its forward
        self.gram_cache = GramCache()  # Gram matrices shared by layers that read one input
        self._layers: dict[nn.Module, _Layer] = {layer.module: _layer(layer) for layer in plan.rule_layers}
        self._names: dict[nn.Module, str] = {layer.module: layer.name for layer in plan.rule_layers}
        self._ties = plan.ties
        self._device = self.params[0][1].device if self.params else torch.device("cpu")
        self._idx: list[int] = []
        self._vals: list[torch.Tensor] = []
        self._per_example: dict[int, list[torch.Tensor]] = {}
        self._tied_parts: dict[int, torch.Tensor] = {}
        self._examples: dict[nn.Module, int] = {}
        self._segments = DeviceIndex()  # the parameter slot of every entry of the concatenated norms
        self._host_sums: bool | None = None  # None: sum on the host for host memory (tests force the tensor path)
        for module in self._layers:
            self._handles.append(module.register_forward_hook(self._on_forward))
        for hooked in plan.hooked_layers:
            self._names[hooked.module] = hooked.name
            hooks = hooked.form.hooks(  # type: ignore[attr-defined]
                hooked.module,
                list(hooked.slots),
                functools.partial(self._on_hooked_norms, dict(hooked.slots)),
                functools.partial(self._count_examples, hooked.module),
            )
            self._handles += hooks.install()

    # -- hooks (hot path: no host syncs, no Python work proportional to the batch) ------------------------------

    def _on_forward(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if not (self.enabled and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if not torch.is_grad_enabled():
            return
        layer = self._layers[module]
        while layer.checks:  # the first call proves what the rule assumes (raises for a look-alike, every call)
            replacement = layer.checks[0](module, inputs, output)
            if replacement is not None:
                layer.rule = replacement
            layer.checks = layer.checks[1:]
        if layer.tie is not None:
            layer.tie.forward(module, inputs)
        # A pre-hook on the autograd node that produced the output receives the output's gradient.  It is cheaper
        # to register than a tensor hook, and keeps firing with the gradient of the value the layer returned when
        # a later operation modifies the output in place (nn.ReLU(inplace=True)): the node stays in the graph.
        # The closure keeps `inputs` until backward; autograd already saves them for the weight gradient.  Under
        # activation checkpointing or offloading it does not: there they go through the same hooks.
        kept = keep_inputs(inputs)
        base = output._base
        if base is None:
            node, nr = output.grad_fn, output.output_nr
            shape = None
        else:
            # A view's own node is dropped when the view is modified in place; the node of its base is not.
            base = _reshaped_base(output, base, inputs)
            if base is None:
                node, nr, shape = output.grad_fn, output.output_nr, None
            else:
                node, nr, shape = base.grad_fn, base.output_nr, output.shape
        if node is None:  # the layer returned a leaf (a parameter or an input as is): hook the tensor itself
            output.register_hook(functools.partial(self._on_leaf_grad, module, kept))
            return
        node.register_prehook(functools.partial(self._on_node_grad, module, kept, nr, shape))

    def _on_leaf_grad(self, module: nn.Module, inputs: tuple[object, ...] | SavedInputs, grad: torch.Tensor) -> None:
        self._on_node_grad(module, inputs, 0, None, (grad,))

    def _on_node_grad(
        self,
        module: nn.Module,
        inputs: tuple[object, ...] | SavedInputs,
        nr: int,
        shape: torch.Size | None,
        grad_outputs: tuple[torch.Tensor | None, ...],
    ) -> None:
        grad = grad_outputs[nr]
        if grad is None or not self.enabled:
            return
        self.watch.touch()
        if isinstance(inputs, SavedInputs):
            inputs = inputs.unpack()
        if shape is not None:
            grad = grad.reshape(shape)
        if torch.is_grad_enabled():  # backward(create_graph=True): keep the statistics out of the graph
            with torch.no_grad():
                self._on_grad_output(module, inputs, grad)
        else:
            self._on_grad_output(module, inputs, grad)

    def _on_grad_output(self, module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> None:
        layer = self._layers[module]
        with use_gram_cache(self.gram_cache):
            norms = layer.rule(module, inputs, grad_output)
        index, tie = layer.slots, layer.tie
        for pname, sq in norms.items():
            slot = index.get(pname)
            if slot is None:
                continue
            if tie is not None and pname == tie.weight:  # one part of three: wait for the others
                self._record(slot, sq, keep=False)
                if self.keep_per_example:
                    self._tied_parts[slot] = self._tied_parts.get(slot, 0) + sq
            else:
                self._record(slot, sq)
        if tie is not None:
            cross = tie.backward(module, inputs, grad_output)
            if cross is not None:
                slot = index[tie.weight]
                self._record(slot, cross, keep=False)
                if self.keep_per_example:
                    total = self._tied_parts.pop(slot) + cross
                    self._per_example.setdefault(slot, []).append(total.detach())
        self._count_examples(module, grad_output.shape[0])

    def _count_examples(self, module: nn.Module, n: int) -> None:
        self._examples[module] = self._examples.get(module, 0) + n

    def _on_hooked_norms(self, index: dict[str, int], name: str, sq: torch.Tensor) -> None:
        if self.enabled:
            self.watch.touch()
            self._record(index[name], sq)

    def _record(self, slot: int, sq: torch.Tensor, *, keep: bool = True) -> None:
        """Keep a layer's per-example norms ``(B,)`` of one parameter; summed over all layers in ``collect()``."""
        self._idx.append(slot)
        self._vals.append(sq)
        if keep and self.keep_per_example:
            self._per_example.setdefault(slot, []).append(sq.detach())

    # -- step interface ----------------------------------------------------------------------------------------

    def examples_seen(self) -> int | None:
        """Examples whose output gradients reached the hooks since the last reset (checked consistent)."""
        if not self._examples:
            return None
        counts = set(self._examples.values())
        if len(counts) > 1:
            usual = Counter(self._examples.values()).most_common(1)[0][0]
            detail = ", ".join(
                f"'{self._names[m]}' ({type(m).__name__}): {n}" for m, n in self._examples.items() if n != usual
            )
            raise StepError(
                f"layers saw different numbers of examples in this step: most saw {usual}, but {detail}. A layer "
                "whose output is broadcast over the batch (a position embedding looked up with (1, T) or (T,) "
                "positions) has no per-example gradient: give it one index row per example (Hugging Face models: "
                "pass position_ids=torch.arange(T).expand(B, T)). A layer called several times per example "
                f"(shared weights, recurrence) cannot be measured per example either. Or use {FALLBACK_HINT}."
            )
        return counts.pop()

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """Sum the per-example squared norms gathered since the last reset; see ``SmallBatchStats``."""
        seen = self.examples_seen()
        if seen is None or not self._vals:
            raise StepError(
                "monitor.step() was called but no backward pass reached the monitored layers since the last "
                "step; call loss.backward() (for every micro-batch) before monitor.step()"
            )
        if seen != batch_size:
            raise StepError(
                f"batch_size={batch_size} was passed to step(), but the hooks saw {seen} examples since the "
                "last step; pass the number of examples of the whole optimizer step (all micro-batches). The hooks "
                "read the first dimension of each layer's input as the batch: sequence-first layers "
                "(batch_first=False, inputs of shape (T, B, ...)) and packed sequences ((1, B*T, ...)) cannot be "
                f"measured per example; use batch-first inputs or {FALLBACK_HINT}"
            )
        # Each example's share of p.grad is a_i; its mean-gradient is B * a_i (SmallBatchStats units): times B^2.
        scale = float(batch_size) ** 2
        first = self._vals[0]
        host = first.device.type == "cpu" if self._host_sums is None else self._host_sums
        if host and all(v.shape == first.shape for v in self._vals):
            # Straight to floats in three operations: right after a backward pass each costs tens of microseconds
            # on a CPU (cold caches), more than the arithmetic.
            per_entry = torch.stack(self._vals).sum(1).tolist()
            host_sums = [0.0] * len(self.params)
            for slot, value in zip(self._idx, per_entry):
                host_sums[slot] += value
            sums = ParamSums([scale * v for v in host_sums])
        else:
            vals = torch.cat(self._vals)  # every layer's per-example norms, (sum of B,)
            summed = torch.zeros(len(self.params), dtype=vals.dtype, device=vals.device)
            segments = self._segments.get(self._idx, vals.device, repeats=[v.shape[0] for v in self._vals])
            summed.index_add_(0, segments, vals, alpha=scale)
            sums = ParamSums(summed)
        return SmallBatchStats(
            small_sq_sum=sums,
            n_small=batch_size,
            inv_size_sum=float(batch_size),
            examples=seen,
            per_example=True,
        )

    def check_first_step(self, any_rank: AnyRank | None) -> None:
        """Refuse measured parameters whose gradients no hook of their layer saw (first step only).

        Under DDP and FSDP2 the ranks pool what they saw (one small all-reduce): a layer that ran on one rank only
        gets the averaged gradient on the others (conditional computation), which is no error.

        Raises:
            StepError: naming those parameters and why their layer's hooks could miss them.
        """
        names = self.unmeasured_with_gradients(any_rank)
        if not names:
            return
        attention = [n for n in names if n in self.attention_params]
        why = (
            "Those of nn.MultiheadAttention are measured from the matrix products inside its forward, which a "
            "torch.compile'd graph hides: keep its forward eager (attn.forward = torch.compiler.disable(attn.forward)"
            f"), or use {FALLBACK_HINT}."
            if attention
            else "Some code uses them without calling their module (a parent passing the weights to a function), so "
            "their per-example norms are unknown and the estimate would be biased. Register a norm rule for the "
            f"module that uses them, or use {FALLBACK_HINT}."
        )
        raise StepError(f"these measured parameters got gradients, but no hook of their layer saw them: {names}. {why}")

    def unmeasured_with_gradients(self, any_rank: AnyRank | None = None) -> list[str]:
        """Measured parameters with a non-zero gradient that no hook of their layer saw since the last reset.

        Such a parameter is used by code other than its layer's forward (a parent passing the weight to a
        function), so its per-example norms are unknown.  A layer that simply did not run has no gradient and is
        not listed.  Reads one number from the device per suspect parameter; none in the usual case.

        Args:
            any_rank: under data parallelism, the element-wise maximum of a tensor over the ranks (a collective
                every rank calls together): a layer whose hooks ran on any rank counts as seen (conditional
                computation gives the others its averaged gradient), and a non-zero part of a gradient on any
                rank (an FSDP2 shard) counts as a gradient.  Every rank then returns the same names.
        """
        seen = set(self._idx)
        if any_rank is None and len(seen) == len(self.params):
            return []
        seen_row = [1 if slot in seen else 0 for slot in range(len(self.params))]
        got_row = [0] * len(self.params)
        for slot, (_, p) in enumerate(self.params):
            g = p.grad
            if slot in seen or g is None:
                continue
            local = g.to_local() if hasattr(g, "to_local") else g  # an FSDP2 DTensor: this rank's shard
            got_row[slot] = int(bool(torch.count_nonzero(dense_values(local))))
        if any_rank is not None:
            flags = any_rank(torch.tensor([seen_row, got_row], dtype=torch.int64, device=self._device))
            seen_row, got_row = flags.tolist()
        return [name for (name, _), saw, got in zip(self.params, seen_row, got_row) if got and not saw]

    def per_example_sq_norms(self) -> dict[str, torch.Tensor]:
        """Per-example squared norms (shares of ``p.grad``) gathered since the last reset, by parameter name.

        Needs ``keep_per_example=True``.  Micro-batches are concatenated in the order their backward ran.
        """
        if not self.keep_per_example:
            raise RuntimeError("construct the collector with keep_per_example=True to keep per-example norms")
        return {self.params[slot][0]: torch.cat(v) for slot, v in self._per_example.items()}

    def reset(self) -> None:
        self._idx = []
        self._vals = []
        self._per_example = {}
        self._tied_parts = {}
        self._examples = {}
        for tie in self._ties:
            tie.reset()


def _reshaped_base(output: torch.Tensor, base: torch.Tensor, inputs: tuple[object, ...]) -> torch.Tensor | None:
    """``base`` (``output._base``) if ``output`` is a pure reshape of it (same elements, same order) computed inside
    the layer; ``None`` otherwise (a partial or permuted view, or a view of an input)."""
    if base.grad_fn is None or base.numel() != output.numel():
        return None
    if not (output.is_contiguous() and base.is_contiguous()) or output.storage_offset() != base.storage_offset():
        return None
    if any(isinstance(t, torch.Tensor) and (t is base or t._base is base) for t in inputs):
        return None
    return base


def _layer(planned: RuleLayer) -> _Layer:
    return _Layer(planned.name, planned.rule.rule, dict(planned.slots), planned.tie, planned.rule.checks)


def _apply_policy(plan: ExamplePlan, on_unsupported: Policy) -> None:
    """Raise or warn, as ``on_unsupported`` says, about what the plan leaves out."""
    if on_unsupported == "ignore":
        return
    problems = [p.describe() for p in plan.left_out if p.kind == "no_rule"]
    if problems:
        msg = (
            "no per-example norm rule for these trainable layers: " + ", ".join(problems) + ". "
            f"Register one with @noisescale.register_norm_rule(LayerClass), use {FALLBACK_HINT}, or pass "
            "on_unsupported='warn' to measure the other layers (coverage is reported)."
        )
        if on_unsupported == "error":
            raise UnsupportedLayerError(msg)
        warnings.warn(msg, stacklevel=4)
    shared = sorted({p.reason for p in plan.left_out if p.kind == "shared"})
    if shared:
        msg = (
            "these tied weights cannot be measured per example (only an nn.Embedding tied to an nn.Linear head is): "
            + "; ".join(shared)
            + f". Pass on_unsupported='warn' to leave them out (coverage is reported), or use {FALLBACK_HINT}."
        )
        if on_unsupported == "error":
            raise SharedParameterError(msg)
        warnings.warn(msg, stacklevel=4)
