"""Where the examples are is checked, not assumed: keyword inputs, subclasses with their own forward,
positions-first models, flattened tokens, and what ``warn`` leaves out, each against a float64 per-example loop."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from tests.helpers.reference import per_example_sq_norms
from torch import nn

import noisescale as ns
from noisescale.collectors.example import ExampleCollector
from noisescale.collectors.example_layout import flattened_from, mark_flattened
from noisescale.errors import StepError, UnsupportedLayerError


def sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss of outputs ``(B, ...)`` against targets of the same shape: the examples stay apart."""
    return (out - y).square().flatten(1).sum(1)


def _check_exact(collector: ExampleCollector, ref: dict[str, torch.Tensor]) -> None:
    got = collector.per_example_sq_norms()
    assert set(got) == {n for n, _ in collector.params}
    for name, values in got.items():
        torch.testing.assert_close(values, ref[name], rtol=1e-9, atol=1e-13, msg=name)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(input=torch.tanh(self.fc1(input=x)))


def test_a_layer_called_with_its_input_as_a_keyword_is_exact():
    torch.manual_seed(0)
    model = KeywordCall().double()
    collector = ExampleCollector(model, keep_per_example=True)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    sq_loss(model(x), y).sum().backward()
    _check_exact(collector, per_example_sq_norms(model, x, y, sq_loss))
    assert collector.collect(5).examples == 5


class LooksUpPositions(nn.Embedding):
    """Whisper's positional embedding: ignores its first input, looks up the positions it is given by keyword."""

    def forward(self, input_ids: torch.Tensor, past: int = 0, position_ids: torch.Tensor | None = None):
        assert position_ids is not None
        return self.weight[position_ids]


class SameAsParent(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 1.0


class WithPositions(nn.Module):
    def __init__(self, positions: nn.Embedding) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, 4), positions, nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        if isinstance(self.pos, LooksUpPositions):
            pos = self.pos(ids, position_ids=torch.arange(t).expand(b, t))
        else:
            pos = self.pos(torch.arange(t).expand(b, t))
        return self.head(torch.tanh(self.tok(ids) + pos))


def test_an_embedding_subclass_that_looks_up_other_indices_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = WithPositions(LooksUpPositions(6, 4))
    collector = ExampleCollector(model)
    with pytest.raises(UnsupportedLayerError, match=r"LooksUpPositions subclasses .*Embedding but overrides forward"):
        model(torch.randint(0, 9, (3, 6)))
    collector.close()


def test_warn_leaves_the_look_alike_out_and_measures_the_rest_exactly():
    torch.manual_seed(0)
    model = WithPositions(LooksUpPositions(6, 4)).double()
    collector = ExampleCollector(model, on_unsupported="warn", keep_per_example=True)
    ids, y = torch.randint(0, 9, (3, 6)), torch.randn(3, 6, 2, dtype=torch.float64)
    sq_loss(model(ids), y).sum().backward()
    with pytest.warns(UserWarning, match=r"'pos' \(.*% of the parameters\): .*overrides forward"):
        stats = collector.collect(3)
    assert stats.examples == 3 and "pos.weight" not in {n for n, _ in collector.params}
    assert collector.coverage == pytest.approx(1 - 24 / (36 + 24 + 10))
    _check_exact(collector, per_example_sq_norms(model, ids, y, sq_loss))


def test_a_subclass_whose_forward_computes_what_its_parent_does_is_exact():
    torch.manual_seed(0)
    model = WithPositions(SameAsParent(6, 4)).double()
    collector = ExampleCollector(model, keep_per_example=True)
    ids, y = torch.randint(0, 9, (3, 6)), torch.randn(3, 6, 2, dtype=torch.float64)
    sq_loss(model(ids), y).sum().backward()
    assert collector.coverage == 1.0
    _check_exact(collector, per_example_sq_norms(model, ids, y, sq_loss))


class WordLM(nn.Module):
    """PyTorch's word-language-model layout: (S, N) token ids, nn.TransformerEncoder(batch_first=False)."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(self.emb(ids)))


def test_positions_first_models_are_measured_on_the_examples_axis():
    torch.manual_seed(0)
    model = WordLM().double()
    collector = ExampleCollector(model, keep_per_example=True)
    s, n = 7, 4
    ids, y = torch.randint(0, 11, (s, n)), torch.randn(s, n, 11, dtype=torch.float64)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (S, n, V): examples on dim 1
        return (out - target).square().sum(dim=(0, 2))

    loss(model(ids), y).sum().backward()
    assert collector.coverage == 1.0
    assert collector.collect(n).examples == n
    _check_exact(collector, per_example_sq_norms(model, ids, y, loss, batch_dim=1))


def test_positions_first_with_as_many_positions_as_examples_is_refused_with_the_true_reason():
    torch.manual_seed(0)
    model = WordLM().double()
    collector = ExampleCollector(model)
    ids = torch.randint(0, 11, (5, 5))
    model(ids).square().sum().backward()
    with pytest.raises(StepError, match=r"'emb' \(Embedding\): refused: .*as many positions as examples"):
        collector.collect(5)


class FlattensTokens(nn.Module):
    """OPT's MLP: (B, T, d) reshaped to (B T, d), two Linear layers, reshaped back."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 12), nn.Linear(12, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        flat = self.ln(h).reshape(-1, d)
        return h + self.fc2(torch.relu(self.fc1(flat))).view(b, t, d)


def test_flattened_tokens_are_grouped_by_example():
    torch.manual_seed(0)
    model = FlattensTokens().double()
    collector = ExampleCollector(model, keep_per_example=True)
    x, y = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    sq_loss(model(x), y).sum().backward()
    assert collector.collect(4).examples == 4
    _check_exact(collector, per_example_sq_norms(model, x, y, sq_loss))


def test_each_forward_pass_reads_its_own_flattened_shape():
    """Micro-batches of one step with the same rows in different (B, T) shapes: each pass is grouped by its own
    examples.  The graph of an earlier micro-batch is freed by then, and must not lend its shape to a new node that
    happens to reuse its memory (it did, through a table keyed by the node's id)."""
    torch.manual_seed(0)
    model = FlattensTokens().double()
    collector = ExampleCollector(model, keep_per_example=True)
    shapes = [(4, 5), (2, 10), (5, 4), (10, 2), (4, 5), (1, 20), (20, 1)] * 3
    xs = [torch.randn(b, t, 6, dtype=torch.float64) for b, t in shapes]
    ys = [torch.randn_like(x) for x in xs]
    for x, y in zip(xs, ys):
        sq_loss(model(x), y).sum().backward()  # the graph goes with the loss, before the next pass
    batch = sum(b for b, _ in shapes)
    assert collector.collect(batch, micro_batch_sizes=[b for b, _ in shapes]).examples == batch
    refs = [per_example_sq_norms(model, x, y, sq_loss) for x, y in zip(xs, ys)]
    _check_exact(collector, {name: torch.cat([r[name] for r in refs]) for name in refs[0]})


def test_a_flattened_mark_stays_with_its_own_node():
    """The mark lives on the autograd node: found through element-wise operations after every Python handle on the
    node is gone, and never found from another graph of the same shape."""
    out = torch.randn(20, 6, requires_grad=True) * 2  # stands for a layer's output over 4 x 5 tokens
    mark_flattened(out, (4, 5))
    others = [torch.randn(20, 6, requires_grad=True) * 2 for _ in range(50)]  # unmarked, same rows
    gc.collect()
    assert flattened_from(torch.relu(out)) == (4, 5)
    assert all(flattened_from(torch.relu(o)) is None for o in others)


class CopiedRows(nn.Module):
    """Rows that come from a copy the hooks cannot trace back to a reshape: not grouped, refused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([h[:, t] for t in range(h.shape[1])])  # (T B, d), position-major
        return self.fc(rows).sum()


def test_untraceable_flattened_rows_are_refused_with_a_hint_that_fits():
    model = CopiedRows()
    collector = ExampleCollector(model)
    model(torch.randn(4, 5, 6)).backward()
    with pytest.raises(StepError, match=r"'fc' \(Linear\): 20\. Its 20 rows look like flattened tokens"):
        collector.collect(4)


class GPT2Positions(nn.Module):
    """GPT-2 and BERT: positions looked up with one (1, T) row, broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))))


class NanoGPTPositions(GPT2Positions):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))))


@pytest.mark.parametrize("model_cls", [GPT2Positions, NanoGPTPositions])
@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_warn_and_ignore_measure_what_they_can_around_broadcast_positions(model_cls, policy):
    torch.manual_seed(0)
    model = model_cls().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = ns.GNSMonitor(model, source="example", on_unsupported=policy)
    ref = None
    for step in range(3):
        ids, y = torch.randint(0, 9, (6, 6)), torch.randn(6, 6, 2, dtype=torch.float64)
        if step == 0:
            ref = per_example_sq_norms(model, ids, y, sq_loss)
        sq_loss(model(ids), y).mean().backward()
        if step == 0 and policy == "warn":
            with pytest.warns(UserWarning, match="'pos'"):
                m = monitor.step(batch_size=6)
        else:
            m = monitor.step(batch_size=6)
        opt.step()
        opt.zero_grad()
        assert m.status == "ok" and "pos.weight" not in m.layers
        assert m.coverage == pytest.approx(1 - 24 / (36 + 24 + 10))
    assert ref is not None
    monitor.close()


def test_warn_measures_the_same_numbers_as_a_model_without_the_left_out_layer():
    """What warn measures is exact: the trace equals the per-example reference over the covered parameters."""
    torch.manual_seed(0)
    model = GPT2Positions().double()
    monitor = ns.GNSMonitor(model, source="example", on_unsupported="ignore")
    ids, y = torch.randint(0, 9, (6, 6)), torch.randn(6, 6, 2, dtype=torch.float64)
    ref = per_example_sq_norms(model, ids, y, sq_loss)
    sq_loss(model(ids), y).mean().backward()
    m = monitor.step(batch_size=6)
    covered = [n for n in ref if n != "pos.weight"]
    small = sum(float(ref[n].sum()) for n in covered) / 36.0  # shares of a mean loss: grad_i / B, squared
    big = sum(float(p.grad.square().sum()) for n, p in model.named_parameters() if n in covered)
    # tr(Sigma) = (S/k - |G_B|^2) / (h - 1/B) with S = B^2 * sum_i |a_i|^2, k = h = B
    expected = (36.0 * small / 6 - big) / (1 - 1 / 6)
    assert math.isclose(m.trace_cov_raw, expected, rel_tol=1e-9)
