"""The cadence under DDP (2 CPU processes, gloo): every rank measures the same steps, and a measured step under
``every=3`` gives the statistics of the every-step run."""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist
from cadence_scenarios import cadence_worker
from dist_harness import run_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(200),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(cadence_worker, world=2, timeout=180)


@pytest.mark.parametrize("name", ["budget", "budget_rank"])
def test_ranks_measure_the_same_steps_under_a_budget(runs, name):
    statuses = [[r["status"] for r in runs[rank][name]["records"]] for rank in range(2)]
    assert statuses[0] == statuses[1]
    measured = [s != "unmeasured" for s in statuses[0]]
    assert measured[0] and not all(measured)  # the budget left steps out
    # the cadence rank 0 chose, recorded on both ranks alike
    assert runs[0][name]["events"] == runs[1][name]["events"]
    assert len(runs[0][name]["events"]) >= 2
    for rank in range(2):
        rec = runs[rank][name]["records"]
        assert all((r["grad_sq_raw"] is None) == (r["status"] == "unmeasured") for r in rec)


def test_every_n_measured_steps_are_the_every_step_statistics_under_ddp(runs):
    for rank in range(2):
        every1, every3 = runs[rank]["every1"]["records"], runs[rank]["every3"]["records"]
        measured = [i for i, r in enumerate(every3) if r["status"] != "unmeasured"]
        assert measured == [0, 3, 6, 9]
        for i in measured:
            assert every3[i]["grad_sq_raw"] == every1[i]["grad_sq_raw"]
            assert every3[i]["trace_cov_raw"] == every1[i]["trace_cov_raw"]
