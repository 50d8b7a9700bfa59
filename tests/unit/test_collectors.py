"""The collectors: micro-batch norms against explicit micro-batch gradients, and the example collector's policies.

Every statistic is checked against a slow float64 reference (``tests/helpers/reference.py``), and every hook
test trains the same seeded model with and without the hooks and asserts equal gradients (STYLE.md rule 7).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tests.helpers.reference import microbatch_mean_grad_sq_norms, per_example_sq_norms
from torch import nn

from noisescale.collectors.example import ExampleCollector
from noisescale.collectors.microbatch import MicrobatchCollector
from noisescale.errors import SharedParameterError, StepError, UnsupportedLayerError

SCALE = 2.0**10

pytestmark = pytest.mark.usefixtures("one_thread")


def sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``(B,)``."""
    return (out - y).square().flatten(1).sum(1)


class Block(nn.Module):
    """Embedding -> Linear -> ReLU(inplace) -> LayerNorm -> Linear over a sequence: every rule family but conv."""

    def __init__(self, vocab: int = 12, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.fc = nn.Linear(d, 8)
        self.act = nn.ReLU(inplace=True)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.act(self.fc(self.emb(idx)))))


def _block_data(batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = Block().double()
    x = torch.randint(0, 12, (batch, 5))
    y = torch.randn(batch, 5, 3, dtype=torch.float64)
    return model, x, y


def _mlp_data(batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return model, torch.randn(batch, 4, dtype=torch.float64), torch.randn(batch, 2, dtype=torch.float64)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sizes: list[int], scale: float = 1.0) -> None:
    """Accumulate the gradient of the step-mean loss over consecutive micro-batches of ``sizes``."""
    total = sum(sizes)
    for xj, yj in zip(torch.split(x, sizes), torch.split(y, sizes), strict=True):
        (sq_loss(model(xj), yj).sum() * (scale / total)).backward()


# -- MicrobatchCollector ----------------------------------------------------------------------------------------


SIZES = {"equal": [4, 4, 4], "unequal3": [2, 5, 3], "unequal2": [1, 6], "one": [7]}
# A micro-batch mean divided by k weighs examples unequally when the sizes differ (not a step-mean gradient, which
# the collector assumes), so that loss is only paired with equal sizes.
LOSS_SIZES = [
    pytest.param(loss, sizes, id=f"{loss}-{name}")
    for loss in ("step_mean", "sum", "micro_mean")
    for name, sizes in SIZES.items()
    if loss != "micro_mean" or len(set(sizes)) == 1
]


@pytest.mark.parametrize(("loss", "sizes"), LOSS_SIZES)
@pytest.mark.parametrize("use_scaler", [False, True], ids=["noscale", "scaler"])
def test_microbatch_matches_explicit_micro_batch_gradients(loss: str, sizes: list[int], use_scaler: bool) -> None:
    batch = sum(sizes)
    model, x, y = _block_data(batch)
    collector = MicrobatchCollector(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if use_scaler else None
    k = len(sizes)
    for xj, yj in zip(torch.split(x, sizes), torch.split(y, sizes), strict=True):
        losses = sq_loss(model(xj), yj)
        value = {"step_mean": losses.sum() / batch, "sum": losses.sum(), "micro_mean": losses.mean() / k}[loss]
        (scaler.scale(value) if scaler is not None else value).backward()
    assert collector.backward_passes() == k
    stats = collector.collect(batch, micro_batch_sizes=None if len(set(sizes)) == 1 else sizes)

    # SmallBatchStats units: p.grad read as the step's mean gradient, so a sum loss counts B times, and the
    # loss scale once.
    unit = (float(batch) if loss == "sum" else 1.0) * (SCALE if use_scaler else 1.0)
    ref = microbatch_mean_grad_sq_norms(model, x, y, sq_loss, sizes)
    expected = torch.stack([ref[n].sum() for n, _ in collector.params]) * unit**2
    torch.testing.assert_close(stats.small_sq_sum.tensor().double(), expected, rtol=1e-10, atol=0.0)
    assert stats.n_small == k
    assert stats.inv_size_sum == pytest.approx(sum(1.0 / s for s in sizes))
    assert stats.examples is None
    assert [n for n, _ in collector.params] == [n for n, _ in model.named_parameters()]
    collector.close()


@pytest.mark.parametrize("sizes", [[3, 3, 3], [2, 5, 2]], ids=["equal", "unequal"])
def test_microbatch_squares_kept_as_tensors_sum_like_host_floats(sizes: list[int]) -> None:
    """On an accelerator the squares stay on the device; forced on a CPU, that path must agree with the floats.

    The last case mixes both, as parameters spread over host and device memory do.
    """
    model, x, y = _block_data(sum(sizes), seed=5)
    results = []
    for host in (True, False, None):
        collector = MicrobatchCollector(model)
        model.zero_grad(set_to_none=True)
        for j, (xj, yj) in enumerate(zip(torch.split(x, sizes), torch.split(y, sizes), strict=True)):
            collector._host_floats = host if host is not None else j % 2 == 0
            (sq_loss(model(xj), yj).sum() / sum(sizes)).backward()
        kinds = {type(v) for v in collector._vals}
        assert kinds == ({float} if host else {torch.Tensor} if host is False else {float, torch.Tensor})
        results.append(collector.collect(sum(sizes), micro_batch_sizes=sizes).small_sq_sum.tensor().double())
        collector.close()
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("sizes", [[4, 4], [3, 5]], ids=["equal", "unequal"])
def test_example_sums_on_the_host_equal_the_tensor_path(sizes: list[int]) -> None:
    """Per-example norms of host gradients are summed into floats; the tensor path (accelerators) must agree."""
    model, x, y = _block_data(sum(sizes), seed=6)
    results = []
    for host in (None, False):
        collector = ExampleCollector(model)
        collector._host_sums = host
        model.zero_grad(set_to_none=True)
        _train_step(model, x, y, sizes)
        stats = collector.collect(sum(sizes))
        # Floats only where every layer's norms have one shape (one batch size); else the tensor path.
        assert stats.small_sq_sum.on_host == (host is None and len(set(sizes)) == 1)
        results.append(stats.small_sq_sum.tensor().double())
        collector.close()
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0.0)
    assert results[0].abs().min() > 0


def test_microbatch_refuses_inconsistent_sizes() -> None:
    model, x, y = _mlp_data(6)
    collector = MicrobatchCollector(model)
    with pytest.raises(StepError, match="no backward pass"):
        collector.collect(6)
    _train_step(model, x, y, [3, 3])
    with pytest.raises(StepError, match="sum to batch_size=6"):
        collector.collect(6, micro_batch_sizes=[2, 2])
    with pytest.raises(StepError, match="2 positive sizes"):
        collector.collect(6, micro_batch_sizes=[1, 2, 3])
    with pytest.raises(StepError, match="at least one example"):
        collector.collect(1)


@pytest.mark.parametrize("collector_cls", [ExampleCollector, MicrobatchCollector])
def test_hooks_do_not_change_gradients(collector_cls: type) -> None:
    model, x, y = _block_data(8, seed=3)
    watched = copy.deepcopy(model)
    collector = collector_cls(watched)
    for m in (model, watched):
        _train_step(m, x, y, [3, 5])
    for (name, p), (_, q) in zip(model.named_parameters(), watched.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad), name
    collector.close()


def test_both_collectors_together_leave_gradients_and_each_other_exact() -> None:
    model, x, y = _block_data(6, seed=4)
    plain = copy.deepcopy(model)
    examples = ExampleCollector(model, keep_per_example=True)
    micro = MicrobatchCollector(model)
    _train_step(model, x, y, [2, 4])
    _train_step(plain, x, y, [2, 4])
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    ref = per_example_sq_norms(model, x, y, sq_loss)
    per_example = examples.per_example_sq_norms()
    assert set(per_example) == set(ref)
    for name, got in per_example.items():
        torch.testing.assert_close(got, ref[name] / 36, rtol=1e-10, atol=1e-14)  # shares: grad l_i / B
    mref = microbatch_mean_grad_sq_norms(model, x, y, sq_loss, [2, 4])
    got = micro.collect(6, micro_batch_sizes=[2, 4]).small_sq_sum.tensor()
    torch.testing.assert_close(got, torch.stack([mref[n].sum() for n, _ in micro.params]), rtol=1e-10, atol=0.0)


# -- ExampleCollector: exactness in awkward models --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (5, 3, 4)], ids=["2d", "3d"])
def test_inplace_ops_after_linear_give_exact_norms(shape: tuple[int, ...]) -> None:
    # On 3-D input a Linear's output is a view; a hook on a view is dropped when the view is modified in place.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 4), nn.Dropout(0.0, inplace=True))
    model = model.double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape, dtype=torch.float64)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            out = self.body(h)
            out += h  # in place on the last Linear's output
            return out

    net = Residual()
    collector = ExampleCollector(net, keep_per_example=True)
    sq_loss(net(x), y).sum().backward()
    got = collector.per_example_sq_norms()
    ref = per_example_sq_norms(net, x, y, sq_loss)
    assert set(got) == set(ref) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-10, atol=1e-14, msg=name)


def test_frozen_parameters_are_excluded() -> None:
    model, x, y = _block_data(5, seed=2)
    model.fc.weight.requires_grad_(False)
    model.ln.requires_grad_(False)
    collector = ExampleCollector(model, keep_per_example=True)
    assert [n for n, _ in collector.params] == ["emb.weight", "fc.bias", "head.weight", "head.bias"]
    assert collector.coverage == 1.0  # coverage counts trainable parameters only
    sq_loss(model(x), y).sum().backward()
    got = collector.per_example_sq_norms()
    ref = per_example_sq_norms(model, x, y, sq_loss)
    assert set(got) == set(ref)
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-10, atol=1e-14, msg=name)


def test_collect_scales_shares_to_the_step_mean_and_checks_the_batch_size() -> None:
    model, x, y = _mlp_data(6)
    collector = ExampleCollector(model, keep_per_example=True)
    with pytest.raises(StepError, match="no backward pass"):
        collector.collect(6)
    _train_step(model, x, y, [6])
    with pytest.raises(StepError, match="hooks saw 6 examples"):
        collector.collect(8)
    stats = collector.collect(6)
    ref = per_example_sq_norms(model, x, y, sq_loss)  # |grad l_i|^2: shares are grad l_i / 6
    torch.testing.assert_close(stats.small_sq_sum.tensor(), torch.stack([ref[n].sum() for n, _ in collector.params]))
    assert (stats.n_small, stats.inv_size_sum, stats.examples) == (6, 6.0, 6)
    collector.reset()
    with pytest.raises(StepError):
        collector.collect(6)


def test_per_example_norms_need_keep_per_example() -> None:
    model, _, _ = _mlp_data(2)
    with pytest.raises(RuntimeError, match="keep_per_example=True"):
        ExampleCollector(model).per_example_sq_norms()


# -- ExampleCollector: policies ---------------------------------------------------------------------------------


class Scale(nn.Module):
    """A layer with a raw parameter and no norm rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class WithGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.gru(x)[0]))


def _unsupported_models() -> list[tuple[str, nn.Module, torch.Tensor, int]]:
    """(name, model, input, parameters without a rule)."""
    torch.manual_seed(0)
    scale = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 2)).double()
    gru = WithGRU().double()
    n_gru = sum(p.numel() for p in gru.gru.parameters())
    return [
        ("custom", scale, torch.randn(5, 3, dtype=torch.float64), 4),
        ("gru", gru, torch.randn(5, 6, 3, dtype=torch.float64), n_gru),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["custom", "gru"])
def test_unsupported_layer_policies(which: int) -> None:
    _, model, x, n_missing = _unsupported_models()[which]
    with pytest.raises(UnsupportedLayerError, match="no per-example norm rule"):
        ExampleCollector(model)
    with pytest.warns(UserWarning, match="no per-example norm rule"):
        warned = ExampleCollector(model, on_unsupported="warn", keep_per_example=True)
    total = sum(p.numel() for p in model.parameters())
    assert warned.coverage == pytest.approx(1 - n_missing / total)
    assert warned.coverage < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ignored = ExampleCollector(model, on_unsupported="ignore")
    assert ignored.coverage == warned.coverage
    assert [n for n, _ in ignored.params] == [n for n, _ in warned.params]
    # The covered layers stay exact.
    y = torch.zeros_like(model(x))
    sq_loss(model(x), y).sum().backward()
    ref = per_example_sq_norms(model, x, y, sq_loss)
    for name, got in warned.per_example_sq_norms().items():
        torch.testing.assert_close(got, ref[name], rtol=1e-10, atol=1e-14, msg=name)


class TiedLM(nn.Module):
    """Embedding whose weight is shared with the output projection (weight tying)."""

    def __init__(self, vocab: int = 10, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.emb(idx)))


def test_tied_embedding_and_head_are_measured_exactly() -> None:
    torch.manual_seed(0)
    model = TiedLM().double()
    collector = ExampleCollector(model, keep_per_example=True)
    assert collector.coverage == 1.0
    x = torch.randint(0, 10, (4, 3))
    y = torch.randn(4, 3, 10, dtype=torch.float64)
    sq_loss(model(x), y).sum().backward()
    ref = per_example_sq_norms(model, x, y, sq_loss)
    got = collector.per_example_sq_norms()
    assert set(got) == set(ref)
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name], rtol=1e-10, atol=1e-14, msg=name)


def test_other_tied_weights_raise_or_are_excluded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2)).double()
    model[2].weight = model[0].weight
    with pytest.raises(SharedParameterError, match="tied weights"):
        ExampleCollector(model)
    with pytest.warns(UserWarning, match="tied weights"):
        collector = ExampleCollector(model, on_unsupported="warn", keep_per_example=True)
    assert [n for n, _ in collector.params] == ["0.bias", "2.bias", "3.weight", "3.bias"]
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    sq_loss(model(x), y).sum().backward()
    ref = per_example_sq_norms(model, x, y, sq_loss)
    for name, got in collector.per_example_sq_norms().items():
        torch.testing.assert_close(got, ref[name], rtol=1e-10, atol=1e-14, msg=name)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.tanh(self.fc(x))))


def test_module_called_twice_per_forward_is_a_step_error() -> None:
    model = Twice()
    collector = ExampleCollector(model)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(StepError, match="different numbers of examples"):
        collector.collect(4)


class PositionEmbedded(nn.Module):
    """Token plus position embeddings, GPT-2 style; ``expand_positions`` gives one index row per example."""

    def __init__(self, expand_positions: bool) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.expand_positions = expand_positions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
        if self.expand_positions:
            positions = positions.expand(ids.shape[0], -1)
        return self.head(torch.tanh(self.tok(ids) + self.pos(positions)))


def test_position_embedding_broadcast_over_the_batch_is_named_in_the_error() -> None:
    model = PositionEmbedded(expand_positions=False)
    collector = ExampleCollector(model)
    model(torch.randint(0, 7, (6, 5))).square().sum().backward()
    with pytest.raises(StepError, match=r"'pos' \(Embedding\): 1\. .*broadcast over the batch.*position_ids"):
        collector.collect(6)
    collector.close()


class NanoGPTPositions(nn.Module):
    """nanoGPT's positions: one ``(T,)`` index for the whole batch, its ``(T, D)`` embedding broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(6, 4), nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))))


@pytest.mark.parametrize("batch", [6, 4], ids=["T==B", "T!=B"])
def test_positions_shared_by_the_batch_are_refused_even_when_T_equals_B(batch: int) -> None:
    """With T == B the example counts agree, so only the first-call check keeps this from being silently wrong."""
    model = NanoGPTPositions()
    collector = ExampleCollector(model)
    with pytest.raises(UnsupportedLayerError, match=r"positions 0\.\.5 as one \(T,\) index shared by the whole"):
        model(torch.randint(0, 7, (batch, 6)))
    collector.close()
    model(torch.randint(0, 7, (batch, 6))).sum().backward()  # the model itself is left as it was


def test_a_batch_of_single_token_ids_is_not_taken_for_positions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 1))
    collector = ExampleCollector(model, keep_per_example=True)
    ids = torch.tensor([3, 1, 4, 1, 5])
    model(ids).square().sum().backward()
    assert collector.collect(5).examples == 5
    collector.close()


def test_position_embedding_with_a_row_per_example_is_exact() -> None:
    torch.manual_seed(0)
    model = PositionEmbedded(expand_positions=True).double()
    collector = ExampleCollector(model, keep_per_example=True)
    ids = torch.randint(0, 7, (6, 5))
    model(ids).square().sum().backward()
    got = collector.per_example_sq_norms()
    ref = per_example_sq_norms(
        model, ids, torch.zeros(6, 5, 2, dtype=torch.float64), lambda out, y: out.square().flatten(1).sum(1)
    )
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-10, atol=1e-14)
    assert collector.collect(6).examples == 6
    collector.close()


def test_sequence_first_inputs_are_explained_in_the_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    collector = ExampleCollector(model)
    model(torch.randn(7, 5, 4)).sum().backward()  # (T=7, B=5, d): the hooks count 7 "examples"
    with pytest.raises(StepError, match=r"hooks saw 7 examples.*sequence-first layers \(batch_first=False"):
        collector.collect(5)
    collector.close()


def test_scope_norm_measures_only_normalisation_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 2)).double()
    collector = ExampleCollector(model, scope="norm", keep_per_example=True)
    assert [n for n, _ in collector.params] == ["1.weight", "1.bias", "3.weight"]
    total = sum(p.numel() for p in model.parameters())
    assert collector.coverage == pytest.approx(12 / total)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    sq_loss(model(x), y).sum().backward()
    ref = per_example_sq_norms(model, x, y, sq_loss)
    got = collector.per_example_sq_norms()
    assert set(got) == {"1.weight", "1.bias", "3.weight"}
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name], rtol=1e-10, atol=1e-14, msg=name)


def test_scope_norm_ignores_unsupported_layers_outside_its_scope() -> None:
    model = WithGRU()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collector = ExampleCollector(model, scope="norm")
    assert [n for n, _ in collector.params] == ["ln.weight", "ln.bias"]
    with pytest.raises(UnsupportedLayerError, match="scope='norm' found no"):
        ExampleCollector(nn.Sequential(nn.Linear(2, 2)), scope="norm")


def _hook_count(model: nn.Module) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + sum(len(p._backward_hooks or {}) for p in model.parameters())


@pytest.mark.parametrize("collector_cls", [ExampleCollector, MicrobatchCollector])
def test_close_removes_every_hook_and_ignores_graphs_built_before(collector_cls: type) -> None:
    model, x, y = _block_data(4)
    before = _hook_count(model)
    collector = collector_cls(model)
    assert _hook_count(model) > before
    loss = sq_loss(model(x), y).sum()  # graph built while hooked
    collector.close()
    assert _hook_count(model) == before
    assert all(not m._forward_hooks for m in model.modules())
    loss.backward()
    with pytest.raises(StepError, match="no backward pass"):
        collector.collect(4)
    sq_loss(model(x), y).sum().backward()  # a fresh graph after close: nothing recorded either
    with pytest.raises(StepError, match="no backward pass"):
        collector.collect(4)


def test_batchnorm_is_refused_with_the_reason() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedLayerError, match="batch statistics couple the examples"):
        ExampleCollector(model)


class _PassThrough(nn.Module):
    """Returns its input as is (a leaf when the input is one); its parameter's rule sees the input's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_layer_that_returns_a_leaf_tensor_is_still_measured() -> None:
    """Its output has no autograd node to hook, so the collector falls back to a hook on the tensor itself."""
    from noisescale.collectors.rules.registry import _RULES, register_norm_rule

    seen: list[torch.Tensor] = []

    def rule(module: nn.Module, inputs: tuple[object, ...], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(grad_output.clone())
        return {"weight": grad_output.square().sum(1)}

    register_norm_rule(_PassThrough)(rule)
    try:
        model = _PassThrough()
        collector = ExampleCollector(model)
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        out = model(x)
        assert out is x and out.grad_fn is None
        (out * torch.arange(12.0, dtype=torch.float64).view(4, 3)).sum().backward()
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], x.grad)
        stats = collector.collect(4)
        torch.testing.assert_close(
            stats.small_sq_sum.tensor(), x.grad.square().sum() * 16 * torch.ones(1, dtype=torch.float64)
        )
    finally:
        del _RULES[_PassThrough]


def test_device_index_is_rebuilt_only_when_the_layout_changes() -> None:
    from noisescale.device_index import DeviceIndex

    cache = DeviceIndex()
    cpu = torch.device("cpu")
    first = cache.get([2, 0, 1], cpu, repeats=[1, 3, 2])
    assert first.tolist() == [2, 0, 0, 0, 1, 1] and first.dtype == torch.long
    assert cache.get([2, 0, 1], cpu, repeats=[1, 3, 2]) is first  # same layout: the same tensor, no new copy
    assert cache.get([2, 0, 1], cpu, repeats=[3, 1, 2]).tolist() == [2, 2, 2, 0, 1, 1]
    assert cache.get([2, 0, 1], cpu).tolist() == [2, 0, 1]
