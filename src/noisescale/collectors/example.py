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

import contextlib
import functools
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from noisescale.collectors import builtin  # noqa: F401  (registers the built-in rules, hooks and ties)
from noisescale.collectors.base import AnyRank, BackwardWatch, HookOwner
from noisescale.collectors.example_layout import (
    Layout,
    LayoutEvidence,
    bind_inputs,
    flattened_from,
    is_reshape,
    mark_flattened,
    reshaped_base,
)
from noisescale.collectors.example_messages import AMBIGUOUS, CountEvidence, Policy, apply_policy
from noisescale.collectors.example_plan import LeftOut, RuleLayer, Scope, plan_example_statistics
from noisescale.collectors.rules.linear import GramCache, use_gram_cache
from noisescale.collectors.rules.registry import ForwardCheck, LayerHooks, NormRule, TiedWeights
from noisescale.collectors.rules.sketch import Sketch, use_sketch
from noisescale.collectors.saved_inputs import Held, SavedInputs, keep_inputs
from noisescale.device_index import DeviceIndex
from noisescale.errors import FALLBACK_HINT, StepError, UnsupportedLayerError
from noisescale.grad_norms import dense_values
from noisescale.stats import ParamSums, SmallBatchStats

if TYPE_CHECKING:
    from noisescale.collectors.observer import ExampleObserver

__all__ = ["ExampleCollector", "Policy", "Scope"]


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
        on_unsupported: what to do with trainable parameters that cannot be measured per example: a layer
            without a rule, a parameter tied between layers in a way no registered form covers (an
            ``nn.Embedding`` tied to its ``nn.Linear`` head is measured exactly), and, on the first step, a layer
            whose first call or example count refuses it (a position embedding broadcast over the batch, a
            look-alike layer, an example axis that cannot be told).  ``"error"`` raises (at construction, or
            from the first call or step that finds it); ``"warn"`` warns once and leaves them out; ``"ignore"``
            leaves them out silently.  Left-out parameters are excluded from the big-batch norm as well, so the
            estimate stays unbiased on the parameters it covers; see ``coverage``.
        scope: ``"all"`` measures every supported layer; ``"norm"`` only normalisation layers (LayerNorm,
            RMSNorm, ...), the cheap proxy of Gray et al. 2024.
        keep_per_example: also keep the per-example vectors (for tests and diagnostics; costs memory).
        watch: told of every backward pass the hooks see (``BackwardWatch``).
        on_left_out: called once, after the first step, with everything left out (if anything), the coverage
            and the number of trainable parameter entries: a caller's own way of saying so.
        sketch: estimate per-example norms from this many random projections where that costs at most half the
            exact form (``rules.sketch``: Linear on sequences, convolutions, embeddings); ``None``: exact.
            Unbiased, fresh each step; the layers ``nn.MultiheadAttention`` measures from the inside stay exact.

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
        on_left_out: Callable[[list[LeftOut], float, int], None] | None = None,
        sketch: int | None = None,
    ) -> None:
        super().__init__(watch)
        self.sketch = Sketch(sketch) if sketch is not None else None
        self._on_left_out = on_left_out
        self.keep_per_example = keep_per_example
        self.policy: Policy = on_unsupported
        plan = plan_example_statistics(model, scope)
        apply_policy(plan, on_unsupported)
        if scope == "norm" and not plan.params:
            raise UnsupportedLayerError(
                "scope='norm' found no trainable normalisation layer (LayerNorm, RMSNorm, ...) in the model; "
                "use scope='all'"
            )
        self.plan = plan
        self.params: list[tuple[str, nn.Parameter]] = list(plan.params)
        self.coverage = plan.coverage
        self.left_out: list[LeftOut] = list(plan.left_out)  # what is not measured, and why
        self.attention_params = set(plan.hooked_params)  # measured by a layer's own hooks, from inside its forward
        self.gram_cache = GramCache()  # Gram matrices shared by layers that read one input
        self._layers: dict[nn.Module, _Layer] = {layer.module: _layer(layer) for layer in plan.rule_layers}
        self._names: dict[nn.Module, str] = {layer.module: layer.name for layer in plan.rule_layers}
        self._hooked_slots: dict[nn.Module, dict[str, int]] = {}
        self._ties = plan.ties
        self._device = self.params[0][1].device if self.params else torch.device("cpu")
        self._idx: list[int] = []
        self._vals: list[torch.Tensor] = []
        self._per_example: dict[int, list[torch.Tensor]] = {}
        self._tied_parts: dict[int, torch.Tensor] = {}
        self._examples: dict[nn.Module, int] = {}
        self._shapes: dict[nn.Module, tuple[int, ...]] = {}  # each layer's last input shape, for the messages
        self._refused: dict[nn.Module, str] = {}  # layers refused in this step: why
        self._calls: dict[nn.Module, int] = {}  # backward calls per layer in this step
        self._dropped: set[nn.Module] = set()  # layers left out since a step refused them
        self._flat_seen = False  # a layer read flattened rows since the last reset (``mark_flattened``)
        # (tie, module) -> the module's last forward inputs and flattened shape, handed to the tie in backward
        self._tie_inputs: dict[tuple[int, int], tuple[nn.Module, tuple[object, ...], tuple[int, ...] | None]] = {}
        self._steps = 0
        self._checking = False
        self._evidence = LayoutEvidence()
        self._segments = DeviceIndex()  # the parameter slot of every entry of the concatenated norms
        self._host_sums: bool | None = None  # None: sum on the host for host memory (tests force the tensor path)
        self.observer: ExampleObserver | None = None  # told of every layer's call and norms (collectors.groups)
        for module in self._layers:
            self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
        self._layer_hooks: list[tuple[LayerHooks, list[RemovableHandle]]] = []  # hooked layers, their handles
        for hooked in plan.hooked_layers:
            self._names[hooked.module] = hooked.name
            slots = dict(hooked.slots)
            self._hooked_slots[hooked.module] = slots  # kept: dropping layers renumbers the slots in place
            hooks = hooked.form.hooks(  # type: ignore[attr-defined]
                hooked.module,
                list(hooked.slots),
                functools.partial(self._on_hooked_norms, slots),
                functools.partial(self._count_examples, hooked.module),
            )
            if hasattr(hooks, "context"):
                hooks.context = self._norm_context  # the sketch and Gram cache reach norms taken in its hooks
            installed = hooks.install()
            self._layer_hooks.append((hooks, installed))
            self._handles += installed
        self._handles += self._evidence.install(model)

    # -- hooks (hot path: no host syncs, no Python work proportional to the batch) ------------------------------

    def _on_forward(
        self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
    ) -> None:
        if not (self.armed and self.enabled and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if not torch.is_grad_enabled() or module in self._dropped or self._checking:
            return
        inputs = bind_inputs(module, args, kwargs)
        layer = self._layers[module]
        while layer.checks:  # the first call proves what the rule assumes
            self._checking = True  # a check may run the layer again (on probes): not a call to measure
            try:
                replacement = layer.checks[0](module, inputs, output)
            except UnsupportedLayerError as e:
                if self.policy == "error":
                    raise  # every call, until the layer is fixed
                self._refused[module] = str(e)
                return
            finally:
                self._checking = False
            if replacement is not None:
                layer.rule = replacement
            layer.checks = layer.checks[1:]
        x = inputs[0] if inputs else None
        lead = None
        if isinstance(x, torch.Tensor):
            self._shapes[module] = tuple(x.shape)
            if x.dim() <= 2 and (self._flat_seen or x._base is not None or is_reshape(x.grad_fn)):
                lead = flattened_from(x)
                if lead is not None:
                    mark_flattened(output, lead)
                    self._flat_seen = True
        if layer.tie is not None:
            self._tie_inputs[(id(layer.tie), id(module))] = (module, inputs, lead)
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
            base = reshaped_base(output, base, inputs)
            if base is None:
                node, nr, shape = output.grad_fn, output.output_nr, None
            else:
                node, nr, shape = base.grad_fn, base.output_nr, output.shape
        if node is None:  # the layer returned a leaf (a parameter or an input as is): hook the tensor itself
            output.register_hook(functools.partial(self._on_leaf_grad, module, kept, lead))
            return
        node.register_prehook(functools.partial(self._on_node_grad, module, kept, lead, nr, shape))

    def _on_leaf_grad(
        self,
        module: nn.Module,
        inputs: Held,
        lead: tuple[int, ...] | None,
        grad: torch.Tensor,
    ) -> None:
        self._on_node_grad(module, inputs, lead, 0, None, (grad,))

    def _on_node_grad(
        self,
        module: nn.Module,
        held: Held,
        lead: tuple[int, ...] | None,
        nr: int,
        shape: torch.Size | None,
        grad_outputs: tuple[torch.Tensor | None, ...],
    ) -> None:
        grad = grad_outputs[nr]
        if grad is None or not self.enabled or module in self._dropped:
            return
        kept = held.take()
        if kept is None:  # pragma: no cover - autograd refuses a second pass through a graph it did not keep
            return
        self.watch.touch()
        inputs = kept.unpack() if isinstance(kept, SavedInputs) else kept
        if shape is not None:
            grad = grad.reshape(shape)
        if torch.is_grad_enabled():  # backward(create_graph=True): keep the statistics out of the graph
            with torch.no_grad():
                self._on_grad_output(module, inputs, lead, grad)
        else:
            self._on_grad_output(module, inputs, lead, grad)

    def _on_grad_output(
        self, module: nn.Module, inputs: tuple[object, ...], lead: tuple[int, ...] | None, grad_output: torch.Tensor
    ) -> None:
        layout = Layout.of(inputs[0] if inputs else None, self._evidence.positions_first, lead)
        if layout.ambiguous:
            self._refused[module] = AMBIGUOUS.format(shape=self._shapes.get(module))
            return
        if layout.transpose or layout.lead is not None:
            inputs, grad_output = layout.apply(inputs, grad_output)
        layer = self._layers[module]
        # An armed observer (per-group statistics) computes the per-example Gram matrices: their diagonals are the
        # norms, so the rule's own pass is skipped.
        observer = self.observer
        norms = None if observer is None else observer.on_layer(module, layer.rule, inputs, grad_output, layer.slots)
        if norms is None:
            with self._norm_context():
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
            self._tie_forward(tie)
            cross = tie.backward(module, inputs, grad_output)
            if cross is not None:
                slot = index[tie.weight]
                self._record(slot, cross, keep=False)
                if self.keep_per_example:
                    total = self._tied_parts.pop(slot) + cross
                    self._per_example.setdefault(slot, []).append(total.detach())
        self._count_examples(module, grad_output.shape[0])

    def _tie_forward(self, tie: TiedWeights) -> None:
        """Hand the tie the inputs of its layers' forward passes, laid out as their rules see them."""
        for key in [k for k in self._tie_inputs if k[0] == id(tie)]:
            module, inputs, lead = self._tie_inputs.pop(key)
            layout = Layout.of(inputs[0] if inputs else None, self._evidence.positions_first, lead)
            tie.forward(module, layout.apply_inputs(inputs))

    def _count_examples(self, module: nn.Module, n: int) -> None:
        self._examples[module] = self._examples.get(module, 0) + n
        self._calls[module] = self._calls.get(module, 0) + 1

    def _on_hooked_norms(self, index: dict[str, int], name: str, sq: torch.Tensor) -> None:
        if self.enabled and name in index:
            self.watch.touch()
            self._record(index[name], sq)

    def _record(self, slot: int, sq: torch.Tensor, *, keep: bool = True) -> None:
        """Keep a layer's per-example norms ``(B,)`` of one parameter; summed over all layers in ``collect()``."""
        self._idx.append(slot)
        self._vals.append(sq)
        if self.observer is not None:
            self.observer.on_norms(sq)
        if keep and self.keep_per_example:
            self._per_example.setdefault(slot, []).append(sq.detach())

    @contextlib.contextmanager
    def _norm_context(self) -> Iterator[None]:
        """Where per-example norms are computed: with this collector's Gram cache and sketch."""
        with use_gram_cache(self.gram_cache), use_sketch(self.sketch):
            yield

    # -- step interface ----------------------------------------------------------------------------------------

    def arm(self, armed: bool, *, step: int) -> None:
        """Arm or disarm the hooks (``Collector.arm``).

        The rule layers' forward hooks and the layout evidence check a flag; the hooks of layers measured from
        the inside (``register_layer_hooks``: ``nn.MultiheadAttention``), which walk the autograd graph in
        Python, are removed while disarmed and installed again when armed.
        """
        if armed != self.armed and self.enabled:
            if armed:
                for i, (hooks, _) in enumerate(self._layer_hooks):
                    installed = hooks.install()
                    self._layer_hooks[i] = (hooks, installed)
                    self._handles += installed
            else:
                gone = {id(h) for _, handles in self._layer_hooks for h in handles}
                for _, handles in self._layer_hooks:
                    for h in handles:
                        h.remove()
                self._handles = [h for h in self._handles if id(h) not in gone]
        self.armed = armed
        self._evidence.armed = armed
        if armed and self.sketch is not None:
            self.sketch.begin(step)  # fresh projections, drawn from the step number

    def examples_seen(self) -> int | None:
        """Examples whose output gradients reached the hooks since the last reset.

        With ``on_unsupported="error"`` every layer must agree; otherwise the count most layers saw (those that
        disagree are left out by ``collect``).
        """
        counts = {m: n for m, n in self._examples.items() if m not in self._refused}
        if not counts:
            return None
        usual = Counter(counts.values()).most_common(1)[0][0]
        if self.policy == "error" and (len(set(counts.values())) > 1 or self._refused):
            raise StepError(self._counts().disagreement(self._examples, self._refused, usual))
        return usual

    def collect(self, batch_size: int, micro_batch_sizes: Sequence[int] | None = None) -> SmallBatchStats:
        """Sum the per-example squared norms gathered since the last reset; see ``SmallBatchStats``."""
        seen = self.examples_seen()
        if seen is None or not self._vals:
            if self._refused and self.policy != "error":
                self._leave_out(dict(self._refused), batch_size)
            raise StepError(
                "monitor.step() was called but no backward pass reached the monitored layers since the last "
                "step; call loss.backward() (for every micro-batch) before monitor.step()"
                if not self._refused
                else "every measured layer was refused in this step: " + "; ".join(self._refused.values())
            )
        odd = {m: n for m, n in self._examples.items() if n != batch_size and m not in self._refused}
        if odd or self._refused:
            if self.policy == "error":
                if seen != batch_size and len(set(self._examples.values())) == 1:
                    raise StepError(self._counts().wrong_batch_size(self._examples, batch_size, seen))
                raise StepError(self._counts().disagreement(self._examples, self._refused, batch_size))
            reasons = {m: f"saw {self._counts().why_count(m, n, batch_size)}" for m, n in odd.items()}
            self._leave_out({**reasons, **self._refused}, batch_size)
        if self._steps == 0 and self._on_left_out is not None and self.left_out:
            self._on_left_out(self.left_out, self.coverage, self.plan.trainable_numel)
        self._steps += 1
        # Each example's share of p.grad is a_i; its mean-gradient is B * a_i (SmallBatchStats units): times B^2.
        scale = float(batch_size) ** 2
        if not self._vals:
            raise StepError("every measured layer was left out in this step; nothing is left to measure")
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
            examples=batch_size,
            per_example=True,
        )

    def _leave_out(self, reasons: dict[nn.Module, str], batch_size: int) -> None:
        """Leave ``reasons``' layers out from now on (policy ``warn`` / ``ignore``), on the first step only."""
        names = ", ".join(f"'{self._names.get(m, type(m).__name__)}'" for m in reasons)
        if self._steps:
            # The measured parameters are fixed after the first step (the estimate's rows and the big batch).
            raise StepError(
                f"these layers could not be measured per example in step {self._steps + 1}, after the first step "
                f"had measured them: {names} ({'; '.join(reasons.values())}); measure from a first step that runs "
                f"every layer, or use {FALLBACK_HINT}"
            )
        total = self.plan.trainable_numel or 1
        entries = []
        for module, why in reasons.items():
            slots = self._slots_of(module)
            numel = sum(self.params[i][1].numel() for i in slots)
            entries.append(
                LeftOut(
                    self._names.get(module, type(module).__name__),
                    "no_rule",
                    why,
                    tuple(self.params[i][0] for i in slots),
                    numel,
                )
            )
        self._drop(set(reasons))
        self.left_out += entries
        if self.policy == "warn":
            detail = "; ".join(
                f"'{e.layer}' ({100 * e.numel / total:.2g}% of the parameters): {e.reason}" for e in entries
            )
            warnings.warn(
                f"noisescale: left out of the per-example measurement, which now covers {100 * self.coverage:.3g}% "
                f"of the trainable parameters: {detail}",
                stacklevel=4,
            )

    def current_rule(self, module: nn.Module) -> NormRule | None:
        """The norm rule measuring ``module`` now (a first call may have replaced the registered one), or ``None``."""
        layer = self._layers.get(module)
        return None if layer is None else layer.rule

    def _slots_of(self, module: nn.Module) -> list[int]:
        if module in self._layers:
            return sorted(set(self._layers[module].slots.values()))
        return sorted(set(self._hooked_slots.get(module, {}).values()))

    def _drop(self, modules: set[nn.Module]) -> None:
        """Stop measuring ``modules``: their slots leave ``params`` and everything is renumbered in place."""
        gone = {i for m in modules for i in self._slots_of(m)}
        keep = [i for i in range(len(self.params)) if i not in gone]
        new = {old: j for j, old in enumerate(keep)}
        self.params = [self.params[i] for i in keep]
        for slots in [*(layer.slots for layer in self._layers.values()), *self._hooked_slots.values()]:
            for name, old in list(slots.items()):
                if old in gone:
                    del slots[name]
                else:
                    slots[name] = new[old]
        kept = [(new[i], v) for i, v in zip(self._idx, self._vals) if i not in gone]
        self._idx, self._vals = [i for i, _ in kept], [v for _, v in kept]
        self._per_example = {new[i]: v for i, v in self._per_example.items() if i not in gone}
        self._dropped |= modules
        for m in modules:
            self._examples.pop(m, None)
        measured = sum(p.numel() for _, p in self.params)
        self.coverage = measured / self.plan.trainable_numel if self.plan.trainable_numel else 0.0
        self._device = self.params[0][1].device if self.params else self._device

    def _counts(self) -> CountEvidence:
        """What the hooks saw of each layer in this step, to explain an example count (``example_messages``)."""
        return CountEvidence(self._names, self._shapes, self._calls)

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
        self._calls = {}
        self._refused = {}
        self._flat_seen = False
        self._tie_inputs = {}
        self._evidence.reset()
        for tie in self._ties:
            tie.reset()


def _layer(planned: RuleLayer) -> _Layer:
    return _Layer(planned.name, planned.rule.rule, dict(planned.slots), planned.tie, planned.rule.checks)
