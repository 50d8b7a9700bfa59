"""Data-parallel measurement on 2 CPU processes (gloo): DDP's ``rank`` source and every source under DDP / FSDP2.

Each group of scenarios runs once, in one spawned pair of processes (a module-scoped fixture), and the tests
below check its records against single-process references computed here.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed
from dist_scenarios import (
    LOCAL,
    STEPS,
    ddp_worker,
    fsdp_worker,
    hook_worker,
    reference_estimate,
    reference_uneven_example,
    single_process_example,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(150),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD = 2
RAW = ("grad_sq_raw", "trace_cov_raw")
SMOOTHED = ("grad_sq", "trace_cov", "b_simple", "b_simple_low", "b_simple_high")


@pytest.fixture(scope="module")
def ddp() -> list[dict[str, Any]]:
    return run_distributed(ddp_worker, world=WORLD)


@pytest.fixture(scope="module")
def fsdp() -> list[dict[str, Any]]:
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    return run_distributed(fsdp_worker, world=WORLD)


def _close(a: float | None, b: float | None, rel: float = 1e-9) -> bool:
    assert a is not None and b is not None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12 * max(1.0, abs(b)))


def _small_batches(runs: list[dict[str, Any]], name: str, step: int, per_rank: int) -> list[Any]:
    """Each rank's examples of ``step``, in rank order, cut into ``per_rank`` consecutive small batches."""
    out = []
    for rank in range(WORLD):
        rec = runs[rank][name][step]
        out += list(zip(rec["x"].chunk(per_rank), rec["y"].chunk(per_rank), strict=True))
    return out


# -- the hook leaves DDP's gradients alone --------------------------------------------------------------------------


@pytest.mark.parametrize(("with_monitor", "without"), [("monitor", "plain"), ("monitor+user", "user")])
def test_gradients_bit_identical_with_the_hook(ddp: list[dict[str, Any]], with_monitor: str, without: str) -> None:
    for rank in range(WORLD):
        got, want = ddp[rank][f"grads/{with_monitor}"], ddp[rank][f"grads/{without}"]
        assert len(got) == len(want) == STEPS + 1
        for step in range(STEPS):
            assert torch.equal(got[step], want[step]), f"rank {rank} step {step}: gradients differ"
    if without == "user":  # the user's hook, registered by the monitor, ran as often as when registered alone
        assert ddp[0][f"grads/{with_monitor}"][-1].item() == ddp[0][f"grads/{without}"][-1].item() > 0


def test_gradients_bit_identical_with_the_hook_on_three_ranks() -> None:
    # DDP multiplies by 1/world_size; torch's allreduce_hook divides, which differs in the last bit for 3 ranks.
    runs = run_distributed(hook_worker, world=3)
    for rank, run in enumerate(runs):
        for step in range(STEPS):
            assert torch.equal(run["grads/monitor"][step], run["grads/plain"][step]), f"rank {rank} step {step}"


# -- the rank source against explicit per-rank gradients ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per_rank"),
    [("rank", 1), ("rank/own_hook", 1), ("rank/bucket_view", 1), ("rank/accum", 1), ("microbatch/accum", 2)],
)
def test_rank_and_microbatch_sources_match_reference(ddp: list[dict[str, Any]], name: str, per_rank: int) -> None:
    for step in range(STEPS):
        state = ddp[0][name][step]["state"]
        total, per_param = reference_estimate(state, _small_batches(ddp, name, step, per_rank))
        m = ddp[0][name][step]["m"]
        assert m["status"] == "ok" and m["batch_size"] == WORLD * LOCAL
        assert m["source"] == name.split("/")[0]
        assert _close(m["grad_sq_raw"], float(total.grad_sq)), (step, m["grad_sq_raw"], float(total.grad_sq))
        assert _close(m["trace_cov_raw"], float(total.trace_cov)), (step, m["trace_cov_raw"], float(total.trace_cov))
        for i, pname in enumerate(state):
            layer = m["layers"][f"module.{pname}"]
            assert _close(layer["grad_sq_raw"], float(per_param.grad_sq[i])), (step, pname)
            assert _close(layer["trace_cov_raw"], float(per_param.trace_cov[i])), (step, pname)


def test_rank_source_with_unused_parameters_measures_the_used_ones(ddp: list[dict[str, Any]]) -> None:
    """``find_unused_parameters=True`` and a layer outside the forward: its hooks never fire, its rows stay empty."""
    for step in range(STEPS):
        rec = ddp[0]["rank/unused"][step]
        state = {n.removeprefix("body."): v for n, v in rec["state"].items() if n.startswith("body.")}
        batches = _small_batches(ddp, "rank/unused", step, 1)
        total, per_param = reference_estimate(state, batches)
        m = rec["m"]
        assert m["status"] == "ok"
        assert _close(m["grad_sq_raw"], float(total.grad_sq)) and _close(m["trace_cov_raw"], float(total.trace_cov))
        for i, pname in enumerate(state):
            assert _close(m["layers"][f"module.body.{pname}"]["trace_cov_raw"], float(per_param.trace_cov[i]))
        for pname in ("weight", "bias"):
            spare = m["layers"][f"module.spare.{pname}"]
            assert spare["grad_sq_raw"] == 0.0 and spare["trace_cov_raw"] == 0.0 and spare["b_simple"] is None


def test_rank_source_b_simple_positive_and_banded(ddp: list[dict[str, Any]]) -> None:
    m = ddp[0]["rank"][-1]["m"]
    assert m["b_simple"] is not None and m["b_simple_low"] <= m["b_simple"] <= m["b_simple_high"]


# -- the example source under DDP and FSDP2 equals one process on the global batch ----------------------------------


def _check_example_matches_single_process(runs: list[dict[str, Any]], prefix: str, name: str = "example") -> None:
    single = single_process_example([runs[r][name] for r in range(WORLD)])
    for step in range(STEPS):
        got, want = runs[0][name][step]["m"], single[step]
        assert got["status"] == want["status"] == "ok"
        assert got["coverage"] == want["coverage"] == 1.0
        for key in RAW + SMOOTHED:
            assert _close(got[key], want[key]), (step, key, got[key], want[key])
        for pname, want_layer in want["layers"].items():
            got_layer = got["layers"][prefix + pname]
            for key in RAW:
                assert _close(got_layer[key], want_layer[key]), (step, pname, key)
        total, _ = reference_estimate(runs[0][name][step]["state"], _small_batches(runs, name, step, LOCAL))
        assert _close(got["trace_cov_raw"], float(total.trace_cov))


def test_example_source_ddp_matches_single_process(ddp: list[dict[str, Any]]) -> None:
    _check_example_matches_single_process(ddp, "module.")


def test_example_source_ddp_uneven_ranks_matches_reference(ddp: list[dict[str, Any]]) -> None:
    # Rank 1 holds fewer examples: the shares of p.grad (not the local units) define every G_i.
    for step in range(STEPS):
        recs = [ddp[r]["example/uneven"][step] for r in range(WORLD)]
        total = reference_uneven_example(recs[0]["state"], [(r["x"], r["y"]) for r in recs])
        m = recs[0]["m"]
        assert m["status"] == "ok" and m["batch_size"] == sum(len(r["x"]) for r in recs)
        assert _close(m["grad_sq_raw"], float(total.grad_sq)) and _close(m["trace_cov_raw"], float(total.trace_cov))


def test_example_source_fsdp2_matches_single_process(fsdp: list[dict[str, Any]]) -> None:
    _check_example_matches_single_process(fsdp, "")


def test_example_source_fsdp2_with_activation_checkpointing_matches_single_process(fsdp: list[dict[str, Any]]) -> None:
    _check_example_matches_single_process(fsdp, "", name="example/checkpointed")


# -- a non-finite gradient on one rank: every rank skips ------------------------------------------------------------


@pytest.mark.parametrize("which", ["ddp/rank", "ddp/example", "fsdp/example"])
def test_nonfinite_on_one_rank_skips_on_every_rank(ddp: Any, fsdp: Any, which: str) -> None:
    kind, source = which.split("/")
    runs = ddp if kind == "ddp" else fsdp
    for rank in range(WORLD):
        status = [rec["m"]["status"] for rec in runs[rank][f"nonfinite/{source}"]]
        skipped = [rec["m"]["skipped_steps"] for rec in runs[rank][f"nonfinite/{source}"]]
        assert status == ["ok", "skipped", "ok"], (rank, status)
        assert skipped == [0, 1, 1], (rank, skipped)


# -- every rank gets the same measurement, bit for bit --------------------------------------------------------------


def _same_bits(a: Any, b: Any) -> bool:
    """Equal as Python values, floats compared by their bits (``-0.0 != 0.0``; ``None`` for NaN on both sides)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)
    return bool(a == b)


def test_every_rank_gets_the_same_measurement(ddp: list[dict[str, Any]], fsdp: list[dict[str, Any]]) -> None:
    skip = ("grads/", "errors", "auto_sources")
    for runs, names in ((ddp, [n for n in ddp[0] if not n.startswith(skip)]), (fsdp, list(fsdp[0]))):
        for name in names:
            for step in range(STEPS):
                a, b = runs[0][name][step]["m"], runs[1][name][step]["m"]
                assert _same_bits(a, b), f"{name} step {step}: ranks disagree"


def test_errors_are_raised_on_every_rank(ddp: list[dict[str, Any]]) -> None:
    want = {
        "example/functional": "StepError: unmeasured",  # the head's weights reach F.linear without its hooks
        "example/one_rank_runs_the_head": "no error",  # rank 1 gets the head's averaged gradient from rank 0
        "example": "StepError",
        "rank": "StepError",
    }
    assert ddp[0]["errors"] == ddp[1]["errors"] == want


def test_auto_takes_the_rank_source_under_ddp_even_with_a_hook(ddp: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        assert ddp[rank]["auto_sources"] == {"plain": "rank", "with_own_hook": "rank"}
