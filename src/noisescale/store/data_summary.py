"""Which data makes a run's gradient noise: its groups' shares and the examples with persistently large gradients.

Built from what ``monitor.step(groups=..., example_ids=...)`` recorded (``group_measurements``,
``example_scores``) for ``noisescale data`` (and its ``--json``).  A run that recorded which of its labels were
corrupted on purpose (an event of kind ``"label_noise"`` with ``{"flipped": [ids]}``, as ``noisescale demo
--noisy-labels`` does) also gets the precision of the top list against them.
"""

from __future__ import annotations

from typing import Any

from noisescale.store.reader import RunReader

__all__ = ["LABEL_NOISE_EVENT", "data_summary", "default_top"]

LABEL_NOISE_EVENT = "label_noise"
TOP_FRACTION = 0.05


def default_top(scored: int) -> int:
    """The length of the top list: 5% of the scored examples, at least 10 (all of them if fewer)."""
    return min(scored, max(10, round(TOP_FRACTION * scored)))


def data_summary(reader: RunReader, *, top: int | None = None, since_step: int = 0) -> dict[str, Any]:
    """A JSON-ready summary: the groups at the last step, the top examples, each group's part of the top list.

    Args:
        reader: the run.
        top: how many examples to list (default ``default_top``).
        since_step: score only steps from this one on (later training, after the first fast drop of the loss).
    """
    with reader.snapshot():
        info = reader.info
        groups = reader.latest_groups()
        scored = reader.scored_example_count()
        n = default_top(scored) if top is None else min(top, scored)
        ranked = reader.scored_examples(since_step=since_step)
        score_steps = reader.score_steps()
        flipped: set[int] | None = None
        for event in reader.events():
            if event["kind"] == LABEL_NOISE_EVENT and isinstance(event["data"], dict):
                flipped = {int(i) for i in event["data"].get("flipped", [])}
    top_rows = ranked[:n]
    by_group: dict[str, int] = {}
    for row in top_rows:
        key = "-" if row["group"] is None else str(row["group"])
        by_group[key] = by_group.get(key, 0) + 1
    out: dict[str, Any] = {
        "run": {"id": info.id, "name": info.name, "path": str(info.path), "status": info.status},
        "groups": {str(g): v for g, v in groups.items()},
        "scored_examples": scored,
        "score_steps": score_steps,
        "since_step": since_step,
        "top": top_rows,
        "top_by_group": by_group,
    }
    if flipped is not None:
        for row in top_rows:
            row["label_flipped"] = row["example"] in flipped
        hits = sum(1 for row in top_rows if row["example"] in flipped)
        out["label_noise"] = {
            "flipped": len(flipped),
            "in_top": hits,
            "precision": hits / len(top_rows) if top_rows else None,
            "recall": hits / len(flipped) if flipped else None,
        }
    return out
