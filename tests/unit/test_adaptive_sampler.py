"""AdaptiveBatchSampler (shards, coverage across batch changes, exact resume) and ExampleClock."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import noisescale as ns
from noisescale.errors import ConfigError


def _epochs_of(samplers, sizes):
    """Pull one step per size from every rank's sampler; returns the global stream of (epoch, index) per step."""
    steps = []
    for b in sizes:
        per_rank = []
        for s in samplers:
            epoch = s.epoch
            s.batch_size = b
            per_rank.append((epoch, s.next_batch()))
        steps.append(per_rank)
    return steps


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_are_disjoint_and_cover_each_example_once_per_epoch_across_batch_changes(world):
    n = 103  # not a multiple of any batch: batches cross epoch boundaries
    rng = random.Random(world)
    sizes = [world * rng.choice([1, 2, 3, 8, 16]) for _ in range(200)]
    samplers = [ns.AdaptiveBatchSampler(n, world, seed=7, num_replicas=world, rank=r) for r in range(world)]
    stream = []
    for per_rank in _epochs_of(samplers, sizes):
        shares = [idx for _, idx in per_rank]
        assert len({len(x) for x in shares}) == 1  # every rank the same share
        flat = [i for share in shares for i in share]
        assert len(flat) == len(set(flat))  # disjoint, and no example twice in a step, even across an epoch end
        stream += flat
    total = sum(sizes)
    assert len(stream) == total
    for e in range(total // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n)), f"epoch {e}"  # each example exactly once


def test_every_rank_agrees_on_the_stream_and_the_epochs_differ():
    a = ns.AdaptiveBatchSampler(50, 10, seed=3)
    b = ns.AdaptiveBatchSampler(50, 10, seed=3)
    first = [a.next_batch() for _ in range(5)]
    second = [a.next_batch() for _ in range(5)]
    assert first == [b.next_batch() for _ in range(5)]
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(50))
    assert first != second
    c = ns.AdaptiveBatchSampler(50, 10, shuffle=False)
    assert c.next_batch() == list(range(10))


def test_resume_from_state_dict_continues_exactly():
    sizes = [8, 8, 16, 24, 24, 8, 32, 16, 16, 8, 40, 8]
    ref = ns.AdaptiveBatchSampler(77, 8, seed=11, num_replicas=2, rank=1)
    want = []
    for b in sizes:
        ref.batch_size = b
        want.append(ref.next_batch())
    half = ns.AdaptiveBatchSampler(77, 8, seed=11, num_replicas=2, rank=1)
    for b in sizes[:5]:
        half.batch_size = b
        half.next_batch()
    saved = half.state_dict()
    assert saved["examples"] == sum(sizes[:5])
    resumed = ns.AdaptiveBatchSampler(77, 8, seed=11, num_replicas=2, rank=1)
    resumed.load_state_dict(saved)
    got = []
    for b in sizes[5:]:
        resumed.batch_size = b
        got.append(resumed.next_batch())
    assert got == want[5:]
    with pytest.raises(ConfigError, match="seed: saved 11, here 12"):
        ns.AdaptiveBatchSampler(77, 8, seed=12, num_replicas=2, rank=1).load_state_dict(saved)


def test_iterating_yields_one_epoch_and_works_as_a_dataloader_batch_sampler():
    data = TensorDataset(torch.arange(30.0))
    sampler = ns.AdaptiveBatchSampler(data, 8, seed=0)
    assert len(sampler) == 4
    loader = DataLoader(data, batch_sampler=sampler)
    sizes, seen = [], Counter()
    for i, (x,) in enumerate(loader):
        sizes.append(len(x))
        seen.update(x.long().tolist())
        if i == 1:
            sampler.batch_size = 4  # between batches
    # 8 + 8 + 4 x 4 = 32: the last batch reaches 2 examples into the next epoch
    assert sizes == [8, 8, 4, 4, 4, 4] and sampler.examples == 32 and sampler.epoch == 1
    assert len(seen) == 30 and len(sampler) == math.ceil(28 / 4)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 4), {}, "empty"),
        ((100, 5), {"num_replicas": 2, "rank": 0}, "does not split evenly over 2 ranks; use a multiple of 2"),
        ((100, 128), {}, "larger than the dataset"),
        ((100, 8), {"num_replicas": 2, "rank": 2}, "rank must be"),
        ((100, 0), {}, "positive int"),
        ((object(), 4), {}, "len"),
    ],
)
def test_bad_sampler_configuration(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ns.AdaptiveBatchSampler(*args, **kwargs)


def test_setting_a_bad_batch_size_between_batches_fails_and_keeps_the_old_one():
    s = ns.AdaptiveBatchSampler(100, 8, num_replicas=2, rank=0)
    with pytest.raises(ConfigError):
        s.batch_size = 7
    assert s.batch_size == 8


# -- ExampleClock ---------------------------------------------------------------------------------------------------


def test_clock_schedule_shapes():
    c = ns.ExampleClock(warmup=100, total=1100, decay="cosine", final=0.1)
    assert [c.factor(e) for e in (0, 50, 100)] == [0.0, 0.5, 1.0]
    assert c.factor(600) == pytest.approx(0.55) and c.factor(1100) == pytest.approx(0.1) and c.factor(5000) == 0.1
    lin = ns.ExampleClock(warmup=0, total=1000, decay="linear", final=0.0)
    assert lin.factor(250) == pytest.approx(0.75)
    wsd = ns.ExampleClock(warmup=100, total=1000, cooldown=200, start=0.1)
    assert wsd.factor(0) == pytest.approx(0.1) and wsd.factor(799) == 1.0 and wsd.factor(900) == pytest.approx(0.5)
    assert ns.ExampleClock().factor(10**9) == 1.0


def test_clock_as_lambdalr_counts_examples_whatever_the_batch():
    def lrs(sizes):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        clock = ns.ExampleClock(warmup=256, total=1024, decay="linear")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, clock)
        out = {}
        for b in sizes:
            opt.step()
            clock.tick(b)
            sched.step()
            out[clock.examples] = opt.param_groups[0]["lr"]
        return out

    small, mixed = lrs([32] * 32), lrs([32] * 4 + [64] * 6 + [128] * 4)
    common = set(small) & set(mixed)
    assert {128, 512, 1024} <= common
    assert all(small[e] == pytest.approx(mixed[e]) for e in common)
    assert small[128] == pytest.approx(0.5) and small[1024] == 0.0


def test_clock_state_and_errors():
    c = ns.ExampleClock(warmup=10)
    c.tick(4)
    c.set(examples=12, step=3)
    c.set(examples=12, step=3)  # idempotent
    assert (c.examples, c.step, c.batch_size) == (12, 3, 4)
    d = ns.ExampleClock(warmup=10)
    d.load_state_dict(c.state_dict())
    assert (d.examples, d.step) == (12, 3)
    with pytest.raises(ConfigError, match="cannot go back"):
        c.set(examples=4, step=4)
    with pytest.raises(ConfigError, match="needs total"):
        ns.ExampleClock(decay="cosine")
    with pytest.raises(ConfigError, match="more than total"):
        ns.ExampleClock(warmup=600, cooldown=600, total=1000)
    with pytest.raises(ConfigError, match="cooldown is for decay='constant'"):
        ns.ExampleClock(total=1000, cooldown=10, decay="linear")
