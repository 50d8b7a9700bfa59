"""``monitor.step(groups=..., example_ids=...)``: per-group noise and per-example scores against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.group_reference import flat_per_example_grads, group_reference
from torch import nn

import noisescale as ns
from noisescale.errors import GroupsError
from noisescale.estimators.groups import GroupSmoother, part_sums, part_sums_host

RAW = ("share_raw", "grad_sq_raw", "trace_cov_raw", "alignment_raw")


class SeqModel(nn.Module):
    """Token and position embeddings, an RMSNorm, a Linear over positions, a LayerNorm and a head."""

    def __init__(self, vocab: int = 11, t: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, 6), nn.Embedding(t, 6)
        self.norm, self.fc, self.ln, self.head = nn.RMSNorm(6), nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(t).expand(b, t))
        return self.head(self.ln(torch.tanh(self.fc(self.norm(h)))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))


def _mlp_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def _batch(kind: str, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "mlp":
        return torch.randn(b, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen)
    return torch.randint(0, 11, (b, 4), generator=gen), torch.randint(0, 11, (b, 4), generator=gen)


def _train_step(model, loss_fn, x, y, sizes):
    b = sum(sizes)
    for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
        (loss_fn(model(xs), ys).sum() / b).backward()


GROUPS = [
    torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 3, 5, 0]),  # unequal groups, one with a single example (5)
    torch.tensor([1, 0, 1, 1, 0, 3, 1, 0, 1, 3, 3, 0]),
    torch.tensor([0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0]),  # groups 2, 3 and 5 are empty in this step
]


@pytest.mark.parametrize("kind", ["mlp", "seq"])
@pytest.mark.parametrize("sizes", [[12], [5, 4, 3]], ids=["one-pass", "accumulation"])
def test_groups_match_the_per_example_reference(kind, sizes):
    torch.manual_seed(0)
    model = (_mlp() if kind == "mlp" else SeqModel()).double()
    loss_fn = _mlp_loss if kind == "mlp" else _seq_loss
    gen = torch.Generator().manual_seed(1)
    monitor = ns.GNSMonitor(model, source="example", per_layer=False)
    first = True
    for groups in [GROUPS[0], *GROUPS]:
        x, y = _batch(kind, 12, gen)
        _train_step(model, loss_fn, x, y, sizes)
        m = monitor.step(batch_size=12, groups=groups)
        if first:  # the first call arms the hooks
            assert m.groups == {} and "step after the first" in (m.groups_reason or "")
            first = False
            model.zero_grad()
            continue
        grads = flat_per_example_grads(model, x, y, loss_fn)
        ref = group_reference(list(grads.split(sizes)), [p.tolist() for p in groups.split(sizes)], 12)
        assert set(m.groups) == {0, 1, 2, 3, 5}  # every group seen so far, the empty ones too
        for gid, gm in m.groups.items():
            r = ref.get(gid)
            if r is None:  # absent from this step: no examples, no share, nothing of its own
                assert gm.examples == 0 and gm.share_raw == 0.0
                assert gm.grad_sq_raw is None and gm.trace_cov_raw is None and gm.alignment_raw is None
                continue
            assert gm.examples == r["examples"]
            for col in RAW:
                got, want = getattr(gm, col), r[col]
                if want is None:
                    assert got is None, (gid, col)
                else:
                    assert got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (gid, col)
        if len(sizes) == 1:  # one pass: the groups split the monitor's own tr(Sigma) exactly
            assert math.isclose(ref[-1]["spread_total"], m.trace_cov_raw, rel_tol=1e-9)
            assert math.isclose(sum(g.share_raw for g in m.groups.values()), 1.0, rel_tol=1e-12)
        model.zero_grad()


def test_one_pass_own_statistics_are_the_two_batch_estimator_of_the_group():
    torch.manual_seed(2)
    model = _mlp().double()
    monitor = ns.GNSMonitor(model, source="example", per_layer=False)
    gen = torch.Generator().manual_seed(3)
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    for _ in range(2):
        x, y = _batch("mlp", 12, gen)
        _train_step(model, _mlp_loss, x, y, [12])
        m = monitor.step(batch_size=12, groups=groups)
        model.zero_grad()
    grads = flat_per_example_grads(model, x, y, _mlp_loss)
    for gid in (0, 1):
        members = grads[groups == gid]
        n = members.shape[0]
        est = ns.two_batch_estimate(members.square().sum(1), 1, members.mean(0).square().sum(), n)
        assert math.isclose(m.groups[gid].grad_sq_raw, float(est.grad_sq), rel_tol=1e-9)
        assert math.isclose(m.groups[gid].trace_cov_raw, float(est.trace_cov), rel_tol=1e-9)


def test_smoothed_values_have_bands_and_follow_the_raw_ones():
    torch.manual_seed(4)
    model = _mlp()
    monitor = ns.GNSMonitor(model, source="example", per_layer=False, halflife=48.0)
    gen = torch.Generator().manual_seed(5)
    groups = torch.arange(16) % 2
    shares = []
    for _ in range(30):
        x, y = _batch("mlp", 16, gen)
        _train_step(model, _mlp_loss, x.float(), y, [16])
        m = monitor.step(batch_size=16, groups=groups)
        model.zero_grad()
        if m.groups:
            shares.append(m.groups[0].share_raw)
    g0 = m.groups[0]
    assert g0.share is not None and g0.share_low <= g0.share <= g0.share_high
    assert 0.0 <= g0.share_low and g0.share_high <= 1.0
    assert math.isclose(m.groups[0].share + m.groups[1].share, 1.0, rel_tol=1e-9)  # one denominator, one pass
    assert min(shares) <= g0.share <= max(shares)
    for gm in m.groups.values():
        if gm.alignment is not None:
            assert -1.0 <= gm.alignment_low <= gm.alignment <= gm.alignment_high <= 1.0
        if gm.b_simple is not None:
            assert gm.b_simple_low <= gm.b_simple <= gm.b_simple_high


def test_host_and_device_paths_agree():
    gen = torch.Generator().manual_seed(6)
    host = GroupSmoother(1.645, 1.96, path="host")
    device = GroupSmoother(1.645, 1.96, path="device")
    for step in range(12):
        n_groups = 2 if step < 4 else 3  # a group appears later
        b = 9
        v = torch.randn(b, 5, generator=gen, dtype=torch.float64) + 0.5
        slots = torch.randint(0, n_groups, (b,), generator=gen)
        sums = part_sums(v @ v.T, slots, n_groups, b)
        a, b_ = host.step(sums, 0.8)(), device.step(sums, 0.8)()
        assert len(a) == len(b_) == n_groups
        for ra, rb in zip(a, b_, strict=True):
            for x, y in zip(ra, rb, strict=True):
                assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15)
    restored = GroupSmoother(1.645, 1.96)
    restored.load_state_dict(device.state_dict())
    assert restored.state_dict() == host.state_dict() or all(
        math.isclose(p, q, rel_tol=1e-12, abs_tol=1e-15)
        for r1, r2 in zip(restored.state_dict()["rows"], host.state_dict()["rows"], strict=True)  # type: ignore[arg-type]
        for p, q in zip(r1, r2, strict=True)
    )


@pytest.mark.parametrize("b", [1, 7])
def test_host_part_sums_are_the_tensor_ones(b):
    gen = torch.Generator().manual_seed(18)
    v = torch.randn(b, 4, generator=gen, dtype=torch.float64)
    slots = torch.randint(0, 3, (b,), generator=gen)
    want = part_sums(v @ v.T, slots, 3, 20)
    got = torch.tensor(part_sums_host((v @ v.T).float(), slots, 3, 20), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_example_scores_are_each_examples_squared_gradient_norm():
    torch.manual_seed(7)
    model = _mlp().double()
    monitor = ns.GNSMonitor(model, source="example", per_layer=False, score_every=2)
    gen = torch.Generator().manual_seed(8)
    sizes = [4, 6]
    kept = 0
    for step in range(1, 6):
        x, y = _batch("mlp", 10, gen)
        ids = torch.arange(10) + 100 * step
        _train_step(model, _mlp_loss, x, y, sizes)
        m = monitor.step(batch_size=10, example_ids=list(ids.split(sizes)), groups=ids % 3)
        if step % 2 or step == 1:
            assert m.example_scores is None  # not a sampled step, or the hooks not armed yet
        else:
            kept += 1
            grads = flat_per_example_grads(model, x, y, _mlp_loss)
            scores = m.example_scores
            assert scores is not None and scores.ids == ids.tolist() and scores.groups == (ids % 3).tolist()
            got = torch.tensor(scores.scores, dtype=torch.float64)
            torch.testing.assert_close(got, grads.square().sum(1), rtol=1e-9, atol=0)
            assert m.to_dict()["example_scores"]["ids"] == ids.tolist()
        model.zero_grad()
    assert kept == 2


def _measure_twice(groups_of_step, **kwargs):
    """A monitor given ``groups_of_step(step)`` and a twin given none, on the same backward passes."""
    torch.manual_seed(9)
    model = _mlp()
    a = ns.GNSMonitor(model, source="example", per_layer=False, **kwargs)
    b = ns.GNSMonitor(model, source="example", per_layer=False)
    gen = torch.Generator().manual_seed(10)
    out = []
    for step in range(1, 5):
        x, y = _batch("mlp", 8, gen)
        _train_step(model, _mlp_loss, x.float(), y, [8])
        try:
            ma, err = a.step(batch_size=8, **groups_of_step(step)), None
        except GroupsError as e:
            ma, err = e.measurement, e
        mb = b.step(batch_size=8)
        out.append((ma, mb, err))
        model.zero_grad()
    return out


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"groups": torch.zeros(7, dtype=torch.int64)}, "7 ids, but the hooks saw 8"),
        ({"groups": torch.zeros(8)}, "dtype torch.float32"),
        ({"groups": torch.zeros(8, dtype=torch.bool)}, "dtype torch.bool"),
        ({"groups": torch.tensor([0, 1, -2, 0, 1, 0, 1, 0])}, "non-negative ids, got -2 at position 2"),
        ({"groups": torch.zeros(2, 4, dtype=torch.int64)}, "must be 1-D"),
        ({"groups": [0, 1, 0, 1, 0, 1, 0, 1]}, "must be a tensor of integer ids, got int"),
        ({"groups": [torch.zeros(4, dtype=torch.int64)] * 2}, "1 backward pass"),
        ({"groups": torch.arange(8)}, "8 distinct ids in this step, more than max_groups=4"),
        ({"example_ids": torch.arange(9)}, "example_ids has 9 ids"),
    ],
)
def test_bad_ids_raise_at_the_step_and_the_step_is_still_measured(bad, message):
    def ids(step: int) -> dict[str, object]:
        return bad if step == 3 else {"groups": torch.arange(8) % 2}

    for step, (ma, mb, err) in enumerate(_measure_twice(ids, max_groups=4), start=1):
        if step == 3:
            assert err is not None and message in str(err) and "was measured without them" in str(err)
        else:
            assert err is None
        assert ma.step == mb.step == step
        # Nothing of the step was lost.  (While groups are measured the per-example norms are the diagonals of the
        # Gram matrices, which differ from the norm rules' in float32 rounding only.)
        assert math.isclose(ma.trace_cov_raw, mb.trace_cov_raw, rel_tol=1e-5)
        assert math.isclose(ma.grad_sq_raw, mb.grad_sq_raw, rel_tol=1e-4, abs_tol=1e-6 * mb.trace_cov_raw)
    assert ma.groups  # groups work again after the bad step


def test_more_groups_over_the_run_than_max_groups():
    def ids(step: int) -> dict[str, object]:
        return {"groups": (torch.arange(8) % 2) + 2 * (step // 3)}  # steps 3 and 4 bring ids 2 and 3

    results = _measure_twice(ids, max_groups=3)
    assert results[1][2] is None
    err = results[2][2]
    assert err is not None and "brings the run to 4 distinct ids, more than max_groups=3" in str(err)


def test_a_sink_gets_the_measurement_of_a_step_with_bad_ids(tmp_path):
    torch.manual_seed(11)
    model = _mlp()
    with ns.Run("bad-ids", dir=tmp_path) as run:
        monitor = ns.GNSMonitor(model, source="example", run=run)
        F.cross_entropy(model(torch.randn(6, 5)), torch.randint(0, 3, (6,))).backward()
        with pytest.raises(GroupsError) as info:
            monitor.step(batch_size=6, groups=torch.zeros(5, dtype=torch.int64))
        assert info.value.measurement.step == 1
        monitor.close()
    with ns.open_run(run.path) as reader:
        assert reader.num_steps() == 1


def test_the_microbatch_source_refuses_groups_clearly():
    torch.manual_seed(12)
    model = _mlp()
    monitor = ns.GNSMonitor(model, source="microbatch")
    _train_step(model, _mlp_loss, torch.randn(8, 5), torch.randint(0, 3, (8,)), [4, 4])
    with pytest.raises(GroupsError, match="source='example'") as info:
        monitor.step(batch_size=8, groups=torch.zeros(8, dtype=torch.int64))
    assert info.value.measurement.step == 1 and info.value.measurement.trace_cov_raw is not None


def test_layers_without_a_gram_form_are_named():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.ln = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(13)
    model = Attn()
    monitor = ns.GNSMonitor(model, source="example", per_layer=False)
    for _ in range(2):
        model(torch.randn(6, 3, 4)).square().mean().backward()
        with pytest.raises(GroupsError, match=r"'attn' \(MultiheadAttention.*scope='norm'"):
            monitor.step(batch_size=6, groups=torch.arange(6) % 2)
        model.zero_grad()
    norm_only = ns.GNSMonitor(model, source="example", scope="norm", per_layer=False)  # the suggested way out
    for _ in range(2):
        model(torch.randn(6, 3, 4)).square().mean().backward()
        m = norm_only.step(batch_size=6, groups=torch.arange(6) % 2)
        model.zero_grad()
    assert set(m.groups) == {0, 1} and m.groups[0].share_raw is not None


def test_no_groups_no_hooks_and_a_restored_monitor_continues_identically():
    torch.manual_seed(14)
    model = _mlp()
    gen = torch.Generator().manual_seed(15)
    batches = [_batch("mlp", 8, gen) for _ in range(8)]
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])

    def run(monitor, steps):
        out = []
        for x, y in steps:
            _train_step(model, _mlp_loss, x.float(), y, [8])
            m = monitor.step(batch_size=8, groups=groups)
            out.append({g: v.to_dict() for g, v in m.groups.items()})
            model.zero_grad()
        return out

    a = ns.GNSMonitor(model, source="example")
    collector = a._sources.active or a._sources.choose()
    run(a, batches[:4])
    state = a.state_dict()
    first = run(a, batches[4:])
    a.close()
    b = ns.GNSMonitor(model, source="example")
    b.load_state_dict(state)
    second = run(b, batches[4:])
    b.close()
    assert first == second and first[0]  # the restored monitor measures groups from its first step
    # A monitor that stops getting groups disarms its hooks.
    c = ns.GNSMonitor(model, source="example")
    run(c, batches[:2])
    ex = c._sources.active
    assert ex is not None and ex.observer is not None  # type: ignore[attr-defined]
    _train_step(model, _mlp_loss, batches[2][0].float(), batches[2][1], [8])
    c.step(batch_size=8)
    assert ex.observer is None  # type: ignore[attr-defined]
    assert collector is not None


def test_the_noisier_source_has_the_larger_share_with_separate_bands():
    """Two synthetic sources of a linear regression, one with noisier targets (issue 16's target)."""
    torch.manual_seed(16)
    d, b = 8, 64
    w_true = torch.randn(d)
    model = nn.Linear(d, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = ns.GNSMonitor(model, source="example", per_layer=False)
    gen = torch.Generator().manual_seed(17)
    groups = torch.arange(b) % 2
    noise = torch.where(groups == 1, 2.0, 0.3)
    for _ in range(60):
        x = torch.randn(b, d, generator=gen)
        y = x @ w_true + noise * torch.randn(b, generator=gen)
        F.mse_loss(model(x).squeeze(1), y).backward()
        m = monitor.step(batch_size=b, groups=groups)
        opt.step()
        opt.zero_grad()
    clean, noisy = m.groups[0], m.groups[1]
    assert noisy.share > clean.share
    assert noisy.share_low > clean.share_high  # the bands do not overlap
    assert noisy.trace_cov > clean.trace_cov


def test_tied_weights_are_named_when_groups_are_asked_for():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(idx)))

    torch.manual_seed(19)
    model = Tied()
    monitor = ns.GNSMonitor(model, source="example", per_layer=False)
    idx = torch.randint(0, 7, (6, 3))
    F.cross_entropy(model(idx).transpose(1, 2), idx).backward()
    with pytest.raises(GroupsError, match="a tied weight"):
        monitor.step(batch_size=6, groups=torch.arange(6) % 2)


def test_example_ids_alone_give_scores_without_gram_matrices():
    torch.manual_seed(20)
    model = _mlp().double()
    monitor = ns.GNSMonitor(model, source="example", per_layer=False, score_every=1)
    gen = torch.Generator().manual_seed(21)
    for step in range(3):
        x, y = _batch("mlp", 8, gen)
        _train_step(model, _mlp_loss, x, y, [8])
        m = monitor.step(batch_size=8, example_ids=torch.arange(8) + 10 * step)
        observer = monitor._groups._observer
        assert observer is not None and not observer.gram_armed  # norms only: the norm rules run as usual
        if step:
            grads = flat_per_example_grads(model, x, y, _mlp_loss)
            assert m.groups == {} and m.example_scores is not None and m.example_scores.groups is None
            got = torch.tensor(m.example_scores.scores, dtype=torch.float64)
            torch.testing.assert_close(got, grads.square().sum(1), rtol=1e-9, atol=0)
        model.zero_grad()


def test_with_a_cadence_measured_steps_have_the_every_step_groups_and_the_others_say_why_not():
    torch.manual_seed(4)
    model = _mlp().double()
    twin = _mlp().double()
    twin.load_state_dict(model.state_dict())
    every = ns.GNSMonitor(model, source="example", per_layer=False, every=2)
    each = ns.GNSMonitor(twin, source="example", per_layer=False)
    gen = torch.Generator().manual_seed(5)
    compared = 0
    for i in range(6):
        x, y = _batch("mlp", 12, gen)
        groups = GROUPS[i % len(GROUPS)]
        for net in (model, twin):
            _train_step(net, _mlp_loss, x, y, [12])
        m = every.step(batch_size=12, groups=groups)
        ref = each.step(batch_size=12, groups=groups)
        if m.status == "unmeasured":
            assert not m.groups and "not measured" in (m.groups_reason or "")
        elif i > 0:  # groups start at the step after the first call with groups=
            compared += 1
            for gid in set(groups.tolist()):  # groups met only on unmeasured steps are not known to `every`
                for name in RAW:
                    assert getattr(m.groups[gid], name) == getattr(ref.groups[gid], name), (i, gid, name)
        model.zero_grad()
        twin.zero_grad()
    assert compared == 2  # steps 3 and 5
