"""``GNSMonitor.step(groups=..., example_ids=...)``: per-group noise and per-example scores, from the example source.

The monitor hands each step to ``GroupStats`` twice: ``begin`` before anything is consumed (it takes what the hooks
kept, ``collectors.groups``, and checks the ids), ``finish`` once the step's own measurement exists (it computes,
smooths and attaches the groups' values and the examples' scores, and arms the hooks for the next step).  Ids that
cannot be used never cost the step: it is measured without them and a ``GroupsError`` carrying the measurement
is raised after it was sent to the sinks.

Why the step after: ``step()`` comes after backward, so the hooks can only know that groups are wanted from the
previous call.  The first step with ``groups=`` arms them (its own ``m.groups`` is empty, ``m.groups_reason`` says
why); per-example norms are kept on every ``score_every``-th step once ``example_ids=`` was passed.  Stopping to
pass them disarms the hooks: no cost.

Under data parallelism each rank passes its own examples' ids; the ranks' per-group sums (and, on sampled steps,
their examples' scores) are gathered in one small collective, summed in rank order, so every rank gets the same
values.  Its result is read on the host (one synchronisation per step with ids, where the ids meet their sums).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from noisescale.collectors.base import Collector
from noisescale.collectors.example import ExampleCollector
from noisescale.collectors.groups import GroupObserver, Taken, unsupported_for_groups
from noisescale.errors import ConfigError, GroupsError, NoiseScaleError
from noisescale.estimators.band import z_for
from noisescale.estimators.groups import FEATURES, GroupSmoother, part_sums, part_sums_host
from noisescale.estimators.smoothing import decay_for
from noisescale.group_types import ExampleScores, GroupMeasurement
from noisescale.types import Measurement

if TYPE_CHECKING:
    from noisescale.distributed import DataParallelSync

__all__ = ["DEFAULT_MAX_GROUPS", "DEFAULT_SCORE_EVERY", "GroupStats"]

DEFAULT_MAX_GROUPS = 16
DEFAULT_SCORE_EVERY = 10
Sums = list[list[float]] | torch.Tensor
"""Per-group sums, ``(len(FEATURES), S)``: Python floats (host path) or a float64 tensor (device path)."""
_SCALED = (1, 2, 4, 6)  # FEATURES that are sums of gradient products (times the units' scale); the rest count
_ARMING = (
    "per-group statistics start at the step after the first one with groups=: the hooks learn from that call "
    "that they are wanted, and this step's backward had already run"
)
_NO_SIGNAL = "no group had two examples in one micro-batch in this step, so no pair of examples could be compared"


@dataclass
class _Ids:
    """Ids checked against the step: one int64 host tensor per backward pass (or one for the step)."""

    parts: list[torch.Tensor]

    @property
    def flat(self) -> torch.Tensor:
        return torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]


@dataclass
class Pending:
    """What ``begin`` found, for ``finish``."""

    taken: Taken | None
    asked: bool = False
    groups: _Ids | None = None
    example_ids: _Ids | None = None
    problems: list[str] = field(default_factory=list)
    collector: Collector | None = None


class GroupStats:
    """Per-group noise and per-example scores of a monitor (see the module docstring).

    Args:
        max_groups: at most this many distinct group ids over the run (each has smoothing state and rows in the
            run store); more is an error at the step that brings them.
        score_every: keep per-example scores on every ``score_every``-th step with ``example_ids=``.
        confidence: the monitor's band confidence.

    Raises:
        ConfigError: ``max_groups`` or ``score_every`` is not a positive int.
    """

    def __init__(self, *, max_groups: int, score_every: int, confidence: float) -> None:
        for name, value in (("max_groups", max_groups), ("score_every", score_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        self.max_groups = max_groups
        self.score_every = score_every
        self._slots: dict[int, int] = {}  # group id -> its slot, in order of first appearance
        self._smoother = GroupSmoother(z_for(confidence), z_for(1.0 - (1.0 - confidence) / 2.0))
        self._observer: GroupObserver | None = None
        self._armed = (False, False)  # (Gram matrices, per-example norms) for the next step
        self._refused: tuple[Collector, str | None] | None = None

    # -- the two calls of a step -------------------------------------------------------------------------------

    def begin(self, collector: Collector, groups: object, example_ids: object) -> Pending:
        """Take what the hooks kept and check the ids; nothing of the step is consumed."""
        taken = self._observer.take() if self._observer is not None else None
        if groups is None and example_ids is None:
            return Pending(taken)
        pending = Pending(taken, asked=True, collector=collector)
        if not isinstance(collector, ExampleCollector):
            pending.problems.append(
                "per-group statistics and per-example scores need per-example gradients, from the example source "
                f"(GNSMonitor(model, source='example')); this monitor measures with {type(collector).__name__}, "
                "whose small batches (micro-batches, ranks) each mix examples of every group and keep only their "
                "own squared norm, so no group's noise can be told from them"
            )
            return pending
        sizes = [p.size for p in taken.passes] if taken is not None and taken.passes else None
        try:
            local = collector.examples_seen()
        except NoiseScaleError:
            local = None  # collect() raises the same, with the whole story
        pending.groups = _checked_ids("groups", groups, sizes, local, pending.problems)
        pending.example_ids = _checked_ids("example_ids", example_ids, sizes, local, pending.problems)
        if pending.groups is not None:
            distinct = int(torch.unique(pending.groups.flat).numel())
            if distinct > self.max_groups:
                pending.problems.append(
                    f"groups= holds {distinct} distinct ids in this step, more than max_groups={self.max_groups}: "
                    "pass GNSMonitor(..., max_groups=N) with N at least the number of groups of the run"
                )
                pending.groups = None
        return pending

    def finish(
        self,
        pending: Pending,
        measurement: Measurement,
        *,
        batch_size: int,
        halflife: float,
        sync: DataParallelSync | None,
    ) -> GroupsError | None:
        """Attach the groups' values and the scores to ``measurement``; arm the hooks for the next step.

        Returns:
            The error to raise once the measurement has gone to the sinks, or ``None``.
        """
        if not pending.asked:
            self._arm(None, gram=False, norms=False)
            return None
        collector = pending.collector
        world = sync.world_size if sync is not None else 1
        scale = (batch_size / world) ** 2  # a share of p.grad times B / W is an example's gradient (DDP averages)
        taken = pending.taken
        reason: str | None = None
        local: tuple[list[int], Sums] | None = None
        refusal = self._refusal(collector) if pending.groups is not None else None
        if refusal is not None:
            pending.problems.append(refusal)
        if pending.groups is not None and not pending.problems:
            if taken is None or not taken.gram_armed or not taken.passes:
                reason = _ARMING
            elif taken.problem is not None:
                reason = f"per-group statistics are left out of this step: {taken.problem}"
            else:
                local = _local_sums(taken, pending.groups, batch_size, scale)
        sampled = (
            pending.example_ids is not None and taken is not None and taken.norms_armed and bool(taken.passes)
        ) and all(p.norms is not None for p in taken.passes)
        invalid = bool(pending.problems)
        if sync is not None:
            params = getattr(collector, "params", None)
            device = params[0][1].device if params else torch.device("cpu")  # where the backend's collectives run
            local, reason, invalid, sampled = _exchange(
                sync,
                self.max_groups,
                local,
                reason,
                invalid,
                sampled,
                requested=pending.groups is not None,
                device=device,
            )
        problems = list(pending.problems)
        if local is not None:
            ids, sums = local
            new = [i for i in ids if i not in self._slots]
            if len(self._slots) + len(new) > self.max_groups:
                problems.append(
                    f"groups= brings the run to {len(self._slots) + len(new)} distinct ids, more than "
                    f"max_groups={self.max_groups}: pass GNSMonitor(..., max_groups=N) with N at least the number of "
                    "groups of the run"
                )
            else:
                for i in sorted(new):
                    self._slots[i] = len(self._slots)
                self._update(measurement, ids, sums, batch_size, halflife)
        elif pending.groups is not None and not problems:
            measurement.set_groups(None, reason or "per-group statistics are undefined in this step")
        if sampled and pending.example_ids is not None and taken is not None:
            measurement.example_scores = _scores(taken, pending, scale, sync)
        next_step = measurement.step + 1
        self._arm(
            collector,
            gram=pending.groups is not None or (invalid and self._armed[0]),
            norms=pending.example_ids is not None and next_step % self.score_every == 0,
        )
        if problems or invalid:
            text = "; ".join(problems) if problems else "another rank passed ids it cannot use (see its error)"
            return GroupsError(
                f"{text}. Step {measurement.step} was measured without them (the error's .measurement).",
                measurement,
            )
        return None

    def close(self) -> None:
        if self._observer is not None:
            self._observer.close()

    # -- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "slots": dict(self._slots),
            "armed": list(self._armed),
            **self._smoother.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any] | None, collector: Collector | None) -> None:
        """Restore ``state_dict()``; the hooks are armed as they were, so the next step measures the same."""
        if state is None:
            return
        self._slots = {int(k): int(v) for k, v in state["slots"].items()}
        self._smoother.load_state_dict(state)
        gram, norms = (bool(v) for v in state["armed"])
        self._armed = (gram, norms)
        if collector is not None:
            self._arm(collector, gram=gram, norms=norms)

    # -- internals ---------------------------------------------------------------------------------------------

    def _arm(self, collector: Collector | None, *, gram: bool, norms: bool) -> None:
        if not isinstance(collector, ExampleCollector):
            gram = norms = False
        elif gram and self._refusal(collector) is not None:
            gram = False
        self._armed = (gram, norms)
        if not (gram or norms):
            if self._observer is not None:
                self._observer.arm(gram=False, norms=False)
            return
        assert isinstance(collector, ExampleCollector)
        if self._observer is None or self._observer.collector is not collector:
            if self._observer is not None:
                self._observer.close()
            self._observer = GroupObserver(collector)
        self._observer.arm(gram=gram, norms=norms)

    def _refusal(self, collector: Collector | None) -> str | None:
        """Why ``collector``'s layers cannot give per-group statistics, or ``None`` (found once per collector)."""
        if not isinstance(collector, ExampleCollector):
            return None
        if self._refused is not None and self._refused[0] is collector:
            return self._refused[1]
        missing = unsupported_for_groups(collector)
        reason = (
            None
            if not missing
            else (
                "per-group statistics need the cross terms between examples' gradients (a Gram form) of every measured "
                f"layer, and these have none: {', '.join(missing)}. Register one with "
                "noisescale.collectors.rules.gram.register_gram_rule(their norm rule), or measure normalisation layers "
                "only (GNSMonitor(..., scope='norm'))"
            )
        )
        self._refused = (collector, reason)
        return reason

    def _update(self, measurement: Measurement, ids: list[int], sums: Sums, batch_size: int, halflife: float) -> None:
        """Fold this step's per-group sums (columns in ``ids``' order) into every known group's rows."""
        n_slots = len(self._slots)
        columns = [self._slots[i] for i in ids]
        full: Sums
        if isinstance(sums, list):
            full = [[0.0] * n_slots for _ in FEATURES]
            for f, row in enumerate(sums):
                for c, v in zip(columns, row, strict=True):
                    full[f][c] = v
            counts: list[float] | torch.Tensor = full[0]
            reason = None if any(p > 0 for p in full[3]) else _NO_SIGNAL
        else:
            full = sums.new_zeros(len(FEATURES), n_slots)
            if ids:
                full.index_copy_(1, torch.tensor(columns, device=sums.device), sums)
            counts = full[0]
            reason = None  # reading the counts would wait for the device
        build = self._smoother.step(full, decay_for(batch_size, halflife))
        order = sorted(self._slots, key=self._slots.__getitem__)

        def groups() -> dict[int, GroupMeasurement]:
            table = build()
            n = counts if isinstance(counts, list) else counts.tolist()
            return {gid: GroupMeasurement.from_row(int(n[s]), table[s]) for s, gid in enumerate(order)}

        measurement.set_groups(groups, reason)


def _checked_ids(
    what: str, ids: object, sizes: list[int] | None, local: int | None, problems: list[str]
) -> _Ids | None:
    """``ids`` as int64 host tensors, one per backward pass when ``sizes`` are known; ``None`` with a problem."""
    if ids is None:
        return None
    per_pass = isinstance(ids, (list, tuple))
    items = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    how = (
        f"pass one integer id per example of this step on this rank, as a 1-D integer tensor (e.g. {what}="
        "torch.as_tensor(ids)), or a list of such tensors, one per micro-batch in backward order"
    )
    parts: list[torch.Tensor] = []
    for k, item in enumerate(items):
        where = f"{what}[{k}]" if per_pass else what
        if not isinstance(item, torch.Tensor):
            problems.append(f"{where} must be a tensor of integer ids, got {type(item).__name__}; {how}")
            return None
        if item.dim() != 1:
            problems.append(f"{where} must be 1-D (one id per example), got shape {tuple(item.shape)}; {how}")
            return None
        if item.is_floating_point() or item.is_complex() or item.dtype == torch.bool:
            problems.append(f"{where} must hold integers, got dtype {item.dtype}; {how}")
            return None
        # Our own copy (the caller may reuse the tensor; the sinks read it later); from an accelerator it waits.
        parts.append(item.detach().to("cpu", torch.int64, copy=True))
    if not parts:
        problems.append(f"{what} is an empty list; {how}")
        return None
    lengths = [int(p.numel()) for p in parts]
    total = sum(lengths)
    if sizes is not None and per_pass and lengths != sizes:
        problems.append(
            f"{what} has {len(parts)} tensor(s) of {lengths} ids, but the step had {len(sizes)} backward pass(es) of "
            f"{sizes} examples on this rank; {how}"
        )
        return None
    expected = sum(sizes) if sizes is not None else local
    if expected is not None and total != expected:
        problems.append(
            f"{what} has {total} ids, but the hooks saw {expected} examples in this step on this rank; {how}"
        )
        return None
    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    if flat.numel() and int(flat.min()) < 0:
        pos = int(torch.nonzero(flat < 0)[0, 0])
        problems.append(f"{what} must be non-negative ids, got {int(flat[pos])} at position {pos}; {how}")
        return None
    if sizes is not None and not per_pass:
        parts = list(torch.split(flat, sizes))
    return _Ids(parts)


def _local_sums(taken: Taken, groups: _Ids, batch_size: int, scale: float) -> tuple[list[int], Sums]:
    """This rank's per-group sums over its backward passes: ``(ids, (len(FEATURES), len(ids)))``, as Python floats
    for Gram matrices in host memory, else a float64 tensor on their device."""
    unique = torch.unique(groups.flat)  # sorted
    ids = [int(v) for v in unique.tolist()]
    host: list[list[float]] | None = None
    total: torch.Tensor | None = None
    for record, part in zip(taken.passes, groups.parts, strict=True):
        assert record.gram is not None
        slots = torch.searchsorted(unique, part)
        if record.gram.device.type == "cpu":
            sums = part_sums_host(record.gram, slots, len(ids), batch_size)
            host = sums if host is None else [[a + b for a, b in zip(r, q, strict=True)] for r, q in zip(host, sums)]
        else:
            t = part_sums(record.gram, slots.to(record.gram.device), len(ids), batch_size)
            total = t if total is None else total + t
    if total is not None:
        if host is not None:  # passes in host memory and on a device: sum on the device
            total = total + torch.tensor(host, dtype=torch.float64, device=total.device)
        scaled = total.clone()
        scaled[list(_SCALED)] *= scale
        return ids, scaled
    assert host is not None
    return ids, [[v * scale for v in row] if f in _SCALED else row for f, row in enumerate(host)]


def _scores(taken: Taken, pending: Pending, scale: float, sync: DataParallelSync | None) -> ExampleScores:
    """This step's per-example squared norms with their ids (every rank's, under data parallelism)."""
    assert pending.example_ids is not None
    norms = torch.cat([p.norms for p in taken.passes if p.norms is not None]) * scale
    ids = pending.example_ids.flat
    groups = pending.groups.flat if pending.groups is not None else None
    if sync is None:
        return ExampleScores(ids, norms, groups)
    return _gathered_scores(sync, ids, norms, groups)


# -- data parallelism ----------------------------------------------------------------------------------------------


def _exchange(
    sync: DataParallelSync,
    max_groups: int,
    local: tuple[list[int], Sums] | None,
    reason: str | None,
    invalid: bool,
    sampled: bool,
    *,
    requested: bool,
    device: torch.device,
) -> tuple[tuple[list[int], Sums] | None, str | None, bool, bool]:
    """Every rank's per-group sums, merged by id in rank order, and the ranks' flags: one all-gather.

    Layout per rank: ``[invalid, undefined, sampled, requested, then max_groups rows of (id or -1, FEATURES...)]``.
    """
    width = 1 + len(FEATURES)
    head = 4
    vec = torch.full((head + max_groups * width,), -1.0, dtype=torch.float64)
    vec[0] = float(invalid)
    vec[1] = float(requested and local is None)
    vec[2] = float(sampled)
    vec[3] = float(requested)
    if local is not None:
        ids, sums = local
        dense = sums.cpu() if isinstance(sums, torch.Tensor) else torch.tensor(sums, dtype=torch.float64)
        table = torch.cat([torch.tensor(ids, dtype=torch.float64).unsqueeze(0), dense.reshape(len(FEATURES), -1)], 0).T
        vec[head : head + table.numel()] = table.reshape(-1)
    work, gathered = sync.start_sum(vec.to(device))
    work.wait()
    rows = gathered.view(sync.world_size, -1).to("cpu").tolist()  # the one host read of the step's group sums
    any_invalid = any(r[0] > 0 for r in rows)
    any_undefined = any(r[1] > 0 for r in rows)
    all_sampled = all(r[2] > 0 for r in rows)
    if not any(r[3] > 0 for r in rows):
        return None, reason, any_invalid, all_sampled and not any_invalid
    if any_invalid or any_undefined:
        if reason is None and not any_invalid:
            reason = "per-group statistics are undefined on another rank in this step (see its m.groups_reason)"
        return None, reason, any_invalid, all_sampled and not any_invalid
    merged: dict[int, list[float]] = {}
    for r in rows:
        for k in range(max_groups):
            row = r[head + k * width : head + (k + 1) * width]
            if row[0] < 0:
                continue
            acc = merged.setdefault(int(row[0]), [0.0] * len(FEATURES))
            for j, v in enumerate(row[1:]):
                acc[j] += v
    ids = sorted(merged)
    totals: Sums = [[merged[i][f] for i in ids] for f in range(len(FEATURES))]  # read on the host already
    return (ids, totals), None, False, all_sampled


def _gathered_scores(
    sync: DataParallelSync, ids: torch.Tensor, norms: torch.Tensor, groups: torch.Tensor | None
) -> ExampleScores:
    """Every rank's examples' ids, scores and groups, in rank order (one all-gather, padded to the longest)."""
    n = int(ids.numel())
    size = torch.tensor([float(n)], dtype=torch.float64, device=norms.device)
    work, sizes = sync.start_sum(size)
    work.wait()
    longest = int(max(sizes.tolist()))
    vec = torch.full((1 + 3 * longest,), -1.0, dtype=torch.float64, device=norms.device)
    vec[0] = n
    vec[1 : 1 + n] = ids.to(norms.device, torch.float64)
    vec[1 + longest : 1 + longest + n] = norms.to(torch.float64)
    if groups is not None:
        vec[1 + 2 * longest : 1 + 2 * longest + n] = groups.to(norms.device, torch.float64)
    work, gathered = sync.start_sum(vec)
    work.wait()
    rows = gathered.view(sync.world_size, -1).cpu()
    all_ids, all_scores, all_groups = [], [], []
    for r in rows:
        k = int(r[0])
        all_ids.append(r[1 : 1 + k])
        all_scores.append(r[1 + longest : 1 + longest + k])
        all_groups.append(r[1 + 2 * longest : 1 + 2 * longest + k])
    return ExampleScores(
        torch.cat(all_ids).to(torch.int64),
        torch.cat(all_scores),
        torch.cat(all_groups).to(torch.int64) if groups is not None else None,
    )
