"""Per-group statistics and per-example scores under DDP (2 CPU processes, gloo) against a float64 reference.

Each rank passes its own examples' groups; groups are split across the ranks, every rank accumulates two
micro-batches, so the reference takes four parts (rank x micro-batch) of per-example gradients.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_distributed
from dist_scenarios import LOCAL, make_model
from groups_scenarios import BAD_STEP, GROUPS, MICRO, STEPS, groups_worker
from tests.helpers.group_reference import flat_per_example_grads, group_reference

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(150),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD = 2
RAW = ("share_raw", "grad_sq_raw", "trace_cov_raw", "alignment_raw")


@pytest.fixture(scope="module")
def both() -> list[dict[str, list[dict[str, Any]]]]:
    return run_distributed(groups_worker, world=WORLD)


@pytest.fixture(scope="module")
def runs(both) -> list[list[dict[str, Any]]]:
    return [r["good"] for r in both]


def _per_example(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model = make_model().double()
    model.load_state_dict(state)
    return flat_per_example_grads(model, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"))


def test_ranks_get_the_same_groups_and_scores(runs):
    for step in range(STEPS):
        assert runs[0][step]["m"] == runs[1][step]["m"]


def test_groups_split_across_ranks_match_the_reference(runs):
    for step in range(1, STEPS):  # the first step arms the hooks
        parts, groups = [], []
        for rank in range(WORLD):
            rec = runs[rank][step]
            grads = _per_example(rec["state"], rec["x"], rec["y"])
            parts += list(grads.chunk(MICRO))
            groups += [g.tolist() for g in torch.tensor(GROUPS[rank]).chunk(MICRO)]
        ref = group_reference(parts, groups, WORLD * LOCAL)
        got = runs[0][step]["m"]["groups"]
        assert set(got) == {0, 1, 2, 3}
        for gid, values in got.items():
            assert values["examples"] == ref[gid]["examples"]
            for col in RAW:
                want = ref[gid][col]
                if want is None:
                    assert values[col] is None, (step, gid, col)
                else:
                    assert math.isclose(values[col], want, rel_tol=1e-9, abs_tol=1e-12), (step, gid, col)


def test_every_ranks_examples_are_scored(runs):
    for step in range(1, STEPS):
        scores = runs[0][step]["m"]["example_scores"]
        want_ids, want = [], []
        for rank in range(WORLD):
            rec = runs[rank][step]
            want_ids += (torch.arange(LOCAL) + 100 * rank + 10 * step).tolist()
            want += _per_example(rec["state"], rec["x"], rec["y"]).square().sum(1).tolist()
        assert scores["ids"] == want_ids
        assert scores["groups"] == GROUPS[0] + GROUPS[1]
        for a, b in zip(scores["scores"], want, strict=True):
            assert math.isclose(a, b, rel_tol=1e-9)


def test_bad_ids_on_one_rank_raise_on_every_rank_without_losing_the_step(both, runs):
    bad = [r["bad"] for r in both]
    for rank in range(WORLD):
        for step in range(STEPS):
            rec, good = bad[rank][step], runs[rank][step]
            # The measurement itself is that of the run with good ids, on every step.
            assert rec["m"]["b_simple"] == good["m"]["b_simple"] and rec["m"]["step"] == step + 1
            if step == BAD_STEP:
                assert rec["error"] is not None and "groups" not in rec["m"]
                if rank == 1:
                    assert "5 ids, but the hooks saw 6 examples" in rec["error"]
                else:
                    assert "another rank" in rec["error"]
            else:
                assert rec["error"] is None
    after, good_after = bad[0][BAD_STEP + 1]["m"]["groups"], runs[0][BAD_STEP + 1]["m"]["groups"]
    for gid in good_after:  # the next step measures the groups again (its smoothing lacks the bad step)
        assert {c: after[gid][c] for c in RAW} == {c: good_after[gid][c] for c in RAW}
