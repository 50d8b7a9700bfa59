"""Which collector measures the small batches: the named sources, and ``"auto"``'s choice among them.

* ``example``: per-example norms from layer hooks (``collectors.example``);
* ``microbatch``: one norm per backward pass under gradient accumulation (``collectors.microbatch``);
* ``rank``: each data-parallel rank's local gradient before DDP averages it (``collectors.rank``);
* ``auto``: under DDP with two or more ranks, ``rank`` right away; otherwise both ``example`` and ``microbatch``
  are installed for the first step, which keeps ``microbatch`` if it had two or more backward passes (almost
  free, and every parameter is measured) and ``example`` otherwise; the other is closed.  Chosen that way, the
  example source measures what it can: layers without per-example gradients (BatchNorm, recurrent layers) are
  left out, with one short warning naming them and their share of the parameters.

Per-example gradients assume a loss that is a sum over independent examples.  A loss that couples the examples of
a batch (a contrastive loss such as CLIP's, in-batch negatives) mixes them in every gradient, and no layer hook can
tell: declare it with ``loss_couples_examples=True``, and the example source is refused in favour of micro-batches
or ranks, whose small batches are still each a batch of the same loss.

The collectors themselves know no source names; this module is where names, the fallbacks of ``auto`` and their
explanations live.
"""

from __future__ import annotations

import warnings
from typing import Literal

from torch import nn

from noisescale.collectors.base import BackwardWatch, Collector
from noisescale.collectors.example import ExampleCollector, Policy, Scope
from noisescale.collectors.example_plan import LeftOut
from noisescale.collectors.microbatch import MicrobatchCollector
from noisescale.collectors.rank import RankCollector
from noisescale.distributed import CommHook, DataParallelSync, is_ddp
from noisescale.errors import ConfigError, NoiseScaleError
from noisescale.preconditioner import AdamPreconditioner

__all__ = ["SOURCES", "Source", "SourceChoice"]

Source = Literal["auto", "example", "microbatch", "rank"]
SOURCES: tuple[Source, ...] = ("auto", "example", "microbatch", "rank")


class SourceChoice:
    """The collectors a monitor installs for ``source``, and the one it measures with.

    Args:
        model: the model to hook.
        source: a name from ``SOURCES``.
        on_unsupported: for the example collector (see ``ExampleCollector``); ``None``: ``"error"`` when the
            example source is asked for by name, and measuring what it can (one short warning) under ``auto``.
        scope: for the example collector.
        loss_couples_examples: the loss couples the examples of a batch: no per-example gradients.
        comm_hook: for ``rank``: a DDP communication hook to register.
        sketch: for the example collector: random projections per layer where they pay (``None``: exact).
        sync: the monitor's data-parallel sync, if the model trains over several ranks.
        watch: told by every collector of each backward pass it sees.
        preconditioner: for the micro-batch and rank collectors: also gather Adam-preconditioned squares.

    Raises:
        ConfigError: an option that does not fit the source; what the chosen collector raises at construction.
    """

    def __init__(
        self,
        model: nn.Module,
        source: Source,
        *,
        on_unsupported: Policy | None,
        scope: Scope,
        loss_couples_examples: bool = False,
        comm_hook: CommHook | None,
        sync: DataParallelSync | None,
        watch: BackwardWatch,
        sketch: int | None = None,
        preconditioner: AdamPreconditioner | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ConfigError(f"source must be one of {list(SOURCES)}, got {source!r}")
        if scope == "norm" and source in ("microbatch", "rank"):
            raise ConfigError("scope='norm' needs per-example norms: use source='example' or 'auto'")
        if sketch is not None and source in ("microbatch", "rank"):
            raise ConfigError(
                f"sketch={sketch} estimates per-example norms, which source={source!r} does not use: pass "
                "source='example' or 'auto', or leave sketch out"
            )
        if preconditioner is not None and (source == "example" or scope == "norm"):
            raise ConfigError(
                "precondition= measures the preconditioned noise scale from micro-batches or ranks, and per-example "
                "norms are not preconditioned: use source='microbatch' (gradient accumulation), 'rank' (DDP) or "
                "'auto' with scope='all'"
            )
        if comm_hook is not None and source != "rank":
            raise ConfigError(f"comm_hook=(state, hook) is for the rank source: pass source='rank', not {source!r}")
        if loss_couples_examples and (source == "example" or scope == "norm"):
            raise ConfigError(
                "loss_couples_examples=True: a loss that couples the examples of a batch (contrastive, in-batch "
                "negatives) has no per-example gradients, so per-example statistics would be wrong; use "
                "source='microbatch' (gradient accumulation), source='rank' (DDP) or source='auto'"
            )
        self.requested: Source = source
        self.collectors: dict[str, Collector] = {}
        self.example_refusal: str | None = None  # why "auto" could not use the example source
        self.active: Collector | None = None
        self.name: str | None = None
        if source == "auto" and loss_couples_examples:
            self.example_refusal = "the loss couples the examples of a batch (loss_couples_examples=True)"
        elif source in ("example", "auto"):
            policy: Policy = on_unsupported or ("ignore" if source == "auto" else "error")
            announce = self._warn_partial_coverage if source == "auto" and on_unsupported is None else None
            try:
                self.collectors["example"] = ExampleCollector(
                    model, on_unsupported=policy, scope=scope, watch=watch, on_left_out=announce, sketch=sketch
                )
            except NoiseScaleError as e:
                if source == "example" or scope == "norm":
                    raise
                self.example_refusal = str(e)
        if source in ("microbatch", "auto"):
            self.collectors["microbatch"] = MicrobatchCollector(model, watch=watch, preconditioner=preconditioner)
        if source == "rank":
            self.collectors["rank"] = RankCollector(
                model, comm_hook=comm_hook, sync=sync, watch=watch, preconditioner=preconditioner
            )
            self.select("rank")
        elif source != "auto":
            self.select(source)
        elif sync is not None and is_ddp(model) and scope == "all":
            # Under DDP the ranks are small batches for free: the cheapest source.
            self.collectors["rank"] = RankCollector(model, sync=sync, watch=watch, preconditioner=preconditioner)
            self.select("rank")

    def select(self, name: str) -> None:
        """Measure with ``name`` from now on; the other collectors are closed."""
        if name not in self.collectors:
            raise ConfigError(f"the saved state used source {name!r}, this monitor has {sorted(self.collectors)}")
        for other, c in list(self.collectors.items()):
            if other != name:
                c.close()
                del self.collectors[other]
        self.active, self.name = self.collectors[name], name

    def choose(self) -> Collector:
        """The active collector; under ``auto``, decided now from the first step's backward passes."""
        if self.active is None:
            micro = self.collectors.get("microbatch")
            assert isinstance(micro, MicrobatchCollector)
            self.select("microbatch" if micro.backward_passes() >= 2 or "example" not in self.collectors else "example")
        assert self.active is not None
        return self.active

    def _warn_partial_coverage(self, left_out: list[LeftOut], coverage: float, trainable: int) -> None:
        """``auto`` chose the example source for a model it cannot measure whole: one short warning."""
        total = trainable or 1
        parts, seen = [], set()
        for item in left_out:
            key = item.reason if item.kind == "shared" else item.layer
            if key in seen:  # one shared parameter, reported by each module that registers it
                continue
            seen.add(key)
            share = f"{100 * item.numel / total:.2g}% of the parameters"
            extra = (
                "; the other layers' per-example gradients are their shares of the batch gradient, which carry the "
                "coupling its batch statistics make between the examples"
                if item.batch_coupled
                else ""
            )
            parts.append(f"'{item.layer}' ({item.reason}{extra}; {share})")
        warnings.warn(
            f"noisescale: source='auto' measures per example ({100 * coverage:.3g}% of the trainable parameters, "
            f"m.coverage); left out: {', '.join(parts)}. Gradient accumulation with >= 2 micro-batches measures "
            "them all",
            RuntimeWarning,
            stacklevel=6,
        )

    def too_few_small_batches(self, n_small: int) -> str:
        """Why a step of ``n_small`` small batches cannot be estimated, and what to do."""
        name = self.name
        if name == "example":
            return (
                f"only {n_small} example in this step: per-example statistics need at least two examples per step "
                "(batch_size >= 2)"
            )
        if self.example_refusal is not None:
            # "auto" fell back to this source; suggesting source='example' would only move the user to that error.
            return (
                f"source='auto' measures with the {name} source because the example source cannot measure this "
                f"model ({self.example_refusal}), and the {name} source needs at least two small batches per step, "
                f"this one had {n_small}: use gradient accumulation with >= 2 micro-batches, or pass "
                "on_unsupported='warn' to measure the supported layers per example"
            )
        return (
            f"only {n_small} small batch(es) in this step: the {name} source needs at least two (use gradient "
            "accumulation with >= 2 micro-batches, or source='example')"
        )

    def close(self) -> None:
        for c in self.collectors.values():
            c.close()
