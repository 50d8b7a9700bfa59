"""Which layers of a model are measured per example, how, and what is left out: a frozen plan, built once.

Planning reads the model and the registry (``rules.registry``) and installs nothing.  Every trainable parameter
ends in exactly one place: measured by its layer's norm rule, measured by a layer's own hooks (a layer whose
parameters are used inside a function, ``nn.MultiheadAttention``), measured with the cross term of a registered
form of weight sharing (an input embedding tied to its output head), or left out with the reason (no rule, a
parameter shared in a way no form covers, out of ``scope``).  The collector (``collectors.example``) then applies
the user's policy to what is left out and installs the hooks the plan names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from noisescale.collectors.rules.registry import (
    LayerRule,
    TiedWeights,
    find_layer_hooks,
    find_layer_rule,
    overrides_forward,
    tied_weight_forms,
)

__all__ = ["ExamplePlan", "HookedLayer", "LeftOut", "RuleLayer", "Scope", "plan_example_statistics"]

Scope = Literal["all", "norm"]

_BATCH_COUPLED = "batch statistics couple the examples, so per-example gradients are undefined"


@dataclass(frozen=True)
class RuleLayer:
    """A module measured by its norm rule.

    Attributes:
        module: the layer.
        name: its qualified name in the model.
        rule: its rule and first-call checks.
        slots: parameter name (relative to the layer) -> index in ``ExamplePlan.params``.
        tie: the cross term of its tied weight, if it shares one with another layer.
    """

    module: nn.Module
    name: str
    rule: LayerRule
    slots: Mapping[str, int]
    tie: TiedWeights | None = None


@dataclass(frozen=True)
class HookedLayer:
    """A module measured by hooks of its own (``register_layer_hooks``).

    Attributes:
        module: the layer.
        name: its qualified name.
        form: the registered hook form.
        slots: parameter name (relative to the layer, submodules' included) -> index in ``ExamplePlan.params``.
    """

    module: nn.Module
    name: str
    form: object
    slots: Mapping[str, int]


@dataclass(frozen=True)
class LeftOut:
    """Trainable parameters the plan does not measure, and why.

    Attributes:
        layer: the module's qualified name.
        kind: ``"no_rule"`` (no rule, or refused by its hook form) or ``"shared"`` (a tie no form covers).
        reason: a short phrase for the user.
        params: the parameters' qualified names.
        numel: their number of entries.
        batch_coupled: a batch-statistics layer (BatchNorm): the others' per-example gradients are then taken
            with its statistics held fixed.
    """

    layer: str
    kind: Literal["no_rule", "shared"]
    reason: str
    params: tuple[str, ...]
    numel: int
    batch_coupled: bool = False

    def describe(self) -> str:
        return f"'{self.layer}' ({self.reason}, params {list(self.params)})"


@dataclass(frozen=True)
class ExamplePlan:
    """The frozen outcome of planning; see the module docstring.

    Attributes:
        params: the measured parameters ``(qualified name, parameter)``, in slot order.
        rule_layers: modules measured by their rules.
        hooked_layers: modules measured by their own hooks.
        ties: the cross terms of measured tied weights.
        left_out: what is not measured, and why.
        trainable_numel: entries of every trainable parameter of the model (for ``coverage``).
        hooked_params: qualified names of the parameters measured by hooked layers.
    """

    params: tuple[tuple[str, nn.Parameter], ...]
    rule_layers: tuple[RuleLayer, ...]
    hooked_layers: tuple[HookedLayer, ...]
    ties: tuple[TiedWeights, ...]
    left_out: tuple[LeftOut, ...]
    trainable_numel: int
    hooked_params: frozenset[str] = field(default_factory=frozenset)

    @property
    def coverage(self) -> float:
        """Fraction of the trainable parameter entries measured."""
        if not self.trainable_numel:
            return 0.0
        return sum(p.numel() for _, p in self.params) / self.trainable_numel


def plan_example_statistics(model: nn.Module, scope: Scope = "all") -> ExamplePlan:
    """Plan the per-example measurement of ``model``; installs nothing and raises nothing.

    Args:
        model: the model.
        scope: ``"all"`` layers, or ``"norm"``: only normalisation layers (the others are out of scope, which is
            neither a missing rule nor a shared weight).
    """
    owners: dict[int, list[str]] = {}
    users: dict[int, list[nn.Module]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(_join(mname, pname))
                users.setdefault(id(p), []).append(module)
    ties: dict[nn.Module, TiedWeights] = {}
    for mods in users.values():
        for form in tied_weight_forms():
            tie = form(mods)
            if tie is not None:
                for m in tie.modules:
                    ties[m] = tie
                break

    params: list[tuple[str, nn.Parameter]] = []
    tied_slots: dict[int, int] = {}
    rule_layers: list[RuleLayer] = []
    hooked_layers: list[HookedLayer] = []
    left_out: list[LeftOut] = []
    hooked_params: set[str] = set()
    seen_modules: set[int] = set()
    never_called: dict[int, str] = {}  # submodules whose parent uses their parameters instead: id -> why
    by_parent: set[int] = set()  # submodules measured by their parent's hooks (nn.MultiheadAttention.out_proj)
    for mname, module in model.named_modules(remove_duplicate=False):
        hook_form = find_layer_hooks(module)
        if hook_form is not None:  # its submodules' parameters are its own too (used by its forward, not theirs)
            own = [(n, module.get_parameter(n)) for n in hook_form.params(module)]
        else:
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own or id(module) in by_parent:
            continue
        rule = find_layer_rule(module)
        if scope == "norm" and not (rule is not None and rule.normalization):
            continue  # out of scope: not measured on purpose
        numel = sum(p.numel() for _, p in own)
        qualified = tuple(_join(mname, n) for n, _ in own)
        if id(module) in seen_modules:
            left_out.append(
                LeftOut(mname, "shared", f"module '{mname}' is registered twice in the model", qualified, 0)
            )
            continue
        seen_modules.add(id(module))
        if hook_form is not None:
            why = hook_form.refuse(module)
            claimed = {n.rpartition(".")[0] for n, _ in own if "." in n}
            if why is not None:
                left_out.append(LeftOut(mname, "no_rule", f"{type(module).__name__} with {why}", qualified, numel))
                for sub in claimed:  # their hooks would never fire while their parameters get gradients
                    never_called[id(module.get_submodule(sub))] = (
                        f"used inside {_label(module)}'s functional forward, never called itself"
                    )
                continue
            by_parent.update(id(module.get_submodule(sub)) for sub in claimed)
            slots = {}
            for n, p in own:
                slots[n] = len(params)
                params.append((_join(mname, n), p))
                hooked_params.add(_join(mname, n))
            hooked_layers.append(HookedLayer(module, mname, hook_form, slots))
            continue
        if id(module) in never_called:
            # Its hooks would never fire while its parameters get gradients: measured as zero, silently wrong.
            left_out.append(LeftOut(mname, "no_rule", never_called[id(module)], qualified, numel))
            continue
        if rule is None and all(_also_in_a_submodule(mname, owners[id(p)]) for _, p in own):
            # Every parameter is also registered in a submodule that uses it (BERT's LM head registers its
            # decoder's bias as its own): reported there, as a shared parameter, not here as a missing rule.
            continue
        if rule is None:
            left_out.append(_no_rule(mname, module, qualified, numel))
            continue
        tie = ties.get(module)
        slots = {}
        for pname, p in own:
            names = owners[id(p)]
            if len(names) > 1 and tie is not None and pname == tie.weight:
                if id(p) not in tied_slots:
                    tied_slots[id(p)] = len(params)
                    params.append((_join(mname, pname), p))
                slots[pname] = tied_slots[id(p)]
                continue
            if len(names) > 1:
                left_out.append(
                    LeftOut(mname, "shared", f"parameter shared by {names}", (_join(mname, pname),), p.numel())
                )
                continue
            slots[pname] = len(params)
            params.append((_join(mname, pname), p))
        if slots:
            rule_layers.append(RuleLayer(module, mname, rule, slots, tie))
    return ExamplePlan(
        params=tuple(params),
        rule_layers=tuple(rule_layers),
        hooked_layers=tuple(hooked_layers),
        ties=tuple(dict.fromkeys(ties.values())),
        left_out=tuple(left_out),
        trainable_numel=sum(p.numel() for p in model.parameters() if p.requires_grad),
        hooked_params=frozenset(hooked_params),
    )


def _no_rule(mname: str, module: nn.Module, qualified: tuple[str, ...], numel: int) -> LeftOut:
    name = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return LeftOut(mname, "no_rule", f"{name}: {_BATCH_COUPLED}", qualified, numel, batch_coupled=True)
    base = overrides_forward(module)
    if base is not None:
        return LeftOut(
            mname,
            "no_rule",
            f"{name} overrides the forward of {base.__name__}, whose rule then no longer applies",
            qualified,
            numel,
        )
    return LeftOut(mname, "no_rule", name, qualified, numel)


def _label(module: nn.Module) -> str:
    """``nn.MultiheadAttention`` for torch's own layers, the class name otherwise."""
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _also_in_a_submodule(mname: str, names: list[str]) -> bool:
    """Whether one of a parameter's registered ``names`` lies in a submodule of the module ``mname``."""
    prefix = f"{mname}." if mname else ""
    return any(n.startswith(prefix) and n.rpartition(".")[0] != mname for n in names)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
