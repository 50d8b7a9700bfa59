"""Under DDP and FSDP2 (2 gloo processes), clipping p.grad before ``monitor.step()`` changes nothing measured."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch.distributed as dist
from clip_scenarios import clip_worker
from dist_harness import run_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(150),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

COLUMNS = ("grad_sq_raw", "trace_cov_raw", "b_simple", "b_simple_low", "b_simple_high")


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(clip_worker)


def test_clipping_before_step_changes_nothing_on_any_rank(runs):
    expected = {"ddp-rank-1", "ddp-rank-2", "ddp-example-1", "ddp-microbatch-2"}
    if importlib.util.find_spec("torch.distributed.fsdp") is not None:
        expected.add("fsdp-example-1")
    assert set(runs[0]) == expected
    for setting, steps in runs[0].items():
        for i, pair in enumerate(steps):
            before, after = pair["before"], pair["after"]
            assert before["status"] == after["status"] == "ok", (setting, i)
            for col in COLUMNS:
                assert math.isclose(before[col], after[col], rel_tol=1e-12), (setting, i, col)
            # every rank reports the same numbers
            assert runs[1][setting][i] == pair, (setting, i)
