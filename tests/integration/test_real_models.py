"""Models nobody on this project wrote, put under the monitor as a new user would, with clipping on.

Each gets exact numbers, a partial coverage that names what is left out, or an error before training that says
what to change; the per-example norms of what is measured are held to a float64 (or ``torch.func``) reference.
The models: a nanoGPT (its own LayerNorm, tied head, ``(T,)`` positions), PyTorch's word-language-model
(positions first, transformer and LSTM), a ResNet-style CNN with BatchNorm, and tiny Hugging Face OPT, T5 and
Whisper models built from configs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.norms import LayerNorm
from tests.helpers.reference import per_example_sq_norms, torch_func_sq_norms
from torch import nn

import noisescale as ns
from noisescale.collectors.example import ExampleCollector

pytestmark = pytest.mark.slow


def _train_with_clipping(model: nn.Module, batches, loss_of, batch_size: int, **monitor_kwargs):
    """Three SGD steps with gradient clipping; returns the last measurement and the warnings raised."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = ns.GNSMonitor(model, **monitor_kwargs)
        for batch in batches:
            loss_of(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            m = monitor.step(batch_size=batch_size)
            opt.step()
            opt.zero_grad()
        monitor.close()
    ours = [str(w.message) for w in caught if "noisescale" in str(w.message)]
    return m, ours


def _assert_exact(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-8) -> None:
    scale = max(float(v.max()) for v in ref.values())
    for name, values in got.items():
        torch.testing.assert_close(values, ref[name], rtol=rtol, atol=1e-12 * scale, msg=name)


# -- nanoGPT -------------------------------------------------------------------------------------------------------


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = LayerNorm(d, bias=True), LayerNorm(d, bias=True)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's structure: token and position embeddings, blocks, a final LayerNorm, a head tied to wte."""

    def __init__(self, vocab: int = 40, block: int = 12, d: int = 16, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = LayerNorm(d, bias=True)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))  # (T,) positions, broadcast
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _nanogpt_batches(steps: int = 3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 40, (4, 12), generator=g) for _ in range(steps)]


def test_nanogpt_is_measured_but_for_its_shared_positions():
    torch.manual_seed(0)
    model = NanoGPT().double()
    m, ours = _train_with_clipping(model, _nanogpt_batches(), lambda mod, idx: mod(idx, idx.roll(-1, 1)), 4)
    wpe = 12 * 16
    total = sum(p.numel() for p in model.parameters())
    assert m.status == "ok" and m.source == "example"
    assert m.coverage == pytest.approx(1 - wpe / total)
    assert len(ours) == 1 and "'wpe'" in ours[0] and "index shared by the whole batch" in ours[0]
    assert "wpe.weight" not in m.layers and "wte.weight" in m.layers  # the tied weight, measured with its head

    collector = ExampleCollector(model, on_unsupported="ignore", keep_per_example=True)
    idx = _nanogpt_batches(4)[-1]

    def per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

    per_example_loss(model(idx), idx.roll(-1, 1)).sum().backward()
    collector.collect(4)
    got = collector.per_example_sq_norms()
    ref = per_example_sq_norms(model, idx, idx.roll(-1, 1), per_example_loss)
    assert set(got) == set(ref) - {"wpe.weight"}
    _assert_exact(got, ref)


# -- PyTorch's word-language-model example ----------------------------------------------------------------------


class PositionalEncoding(nn.Module):
    def __init__(self, d: int, max_len: int = 64) -> None:
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, 1, d)
        pe[:, 0, 0::2], pe[:, 0, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.size(0)]


class WordLanguageModel(nn.Module):
    """The example's layout: (S, N) token ids in, (S, N, V) log-probabilities out, positions first."""

    def __init__(self, kind: str, vocab: int = 30, d: int = 16) -> None:
        super().__init__()
        self.kind = kind
        self.encoder = nn.Embedding(vocab, d)
        if kind == "transformer":
            self.pos = PositionalEncoding(d)
            layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0)
            self.body: nn.Module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(d, d, 2)
        self.decoder = nn.Linear(d, vocab)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        x = self.encoder(src) * math.sqrt(16)
        if self.kind == "transformer":
            mask = nn.Transformer.generate_square_subsequent_mask(src.shape[0], dtype=x.dtype)
            out = self.body(self.pos(x), mask=mask)
        else:
            out, _ = self.body(x)
        return F.log_softmax(self.decoder(out), dim=-1)


def _word_batches(steps: int = 3, s: int = 9, n: int = 5):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 30, (s + 1, n), generator=g) for _ in range(steps)]


def _word_loss(model: nn.Module, data: torch.Tensor) -> torch.Tensor:
    out = model(data[:-1])
    return F.nll_loss(out.reshape(-1, out.size(-1)), data[1:].reshape(-1))


def _word_per_example(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (S, n, V): n on dim 1
    return F.nll_loss(log_probs.permute(1, 2, 0), targets.T, reduction="none").mean(1)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_word_language_model_is_measured_on_its_examples_axis(kind):
    torch.manual_seed(0)
    model = WordLanguageModel(kind).double()
    m, ours = _train_with_clipping(model, _word_batches(), _word_loss, 5)
    assert m.status == "ok"
    if kind == "transformer":
        assert m.coverage == 1.0 and ours == []
    else:  # the LSTM has no per-example rule: left out, named, the rest measured
        lstm = sum(p.numel() for p in model.body.parameters())
        assert m.coverage == pytest.approx(1 - lstm / sum(p.numel() for p in model.parameters()))
        assert len(ours) == 1 and "'body' (LSTM" in ours[0]

    collector = ExampleCollector(model, on_unsupported="ignore", keep_per_example=True)
    data = _word_batches(4)[-1]
    _word_per_example(model(data[:-1]), data[1:]).sum().backward()
    assert collector.collect(5).examples == 5
    ref = per_example_sq_norms(model, data[:-1], data[1:], _word_per_example, batch_dim=1)
    got = collector.per_example_sq_norms()
    assert set(got) == {n for n, _ in collector.params}
    _assert_exact(got, ref)


# -- a ResNet-style CNN with BatchNorm -----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_resnet_style_cnn_leaves_its_batchnorms_out_and_says_what_that_means():
    torch.manual_seed(0)
    model = TinyResNet().double()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
        batches.append((x, x.mean(dim=(2, 3)).argmax(1)))  # a class the image says: a clear signal
    m, ours = _train_with_clipping(model, batches, lambda mod, b: F.cross_entropy(mod(b[0]), b[1]), 16)
    bn = sum(p.numel() for mod in model.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters())
    assert m.status == "ok", m.undefined_reason
    assert m.coverage == pytest.approx(1 - bn / sum(p.numel() for p in model.parameters()))
    assert len(ours) == 1 and "BatchNorm2d" in ours[0] and "batch statistics" in ours[0]

    # With BatchNorm in eval mode (the statistics held fixed) the examples are independent: exact.
    model.eval()
    collector = ExampleCollector(model, on_unsupported="ignore", keep_per_example=True)
    x, y = batches[0]

    def per_example(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, reduction="none")

    per_example(model(x), y).sum().backward()
    _assert_exact(collector.per_example_sq_norms(), per_example_sq_norms(model, x, y, per_example))


# -- Hugging Face OPT, T5, Whisper (built from configs) -----------------------------------------------------------

V, B, L = 40, 4, 10


def _hf(name: str) -> nn.Module:
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "opt":
            config = T.OPTConfig(
                vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=16, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                attn_implementation="eager",
            )  # fmt: skip
            return T.OPTForCausalLM(config).double().train()
        if name == "t5":
            config = T.T5Config(
                vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
                decoder_start_token_id=0,
            )  # fmt: skip
            return T.T5ForConditionalGeneration(config).double().train()
        config = T.WhisperConfig(
            vocab_size=V, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            max_source_positions=8, max_target_positions=16, decoder_start_token_id=0, pad_token_id=0,
            bos_token_id=0, eos_token_id=0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            attn_implementation="eager",
        )  # fmt: skip
        return T.WhisperForConditionalGeneration(config).double().train()


def _hf_batch(name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    if name == "opt":
        return {"input_ids": ids, "labels": ids}
    if name == "t5":
        return {"input_ids": ids, "labels": torch.randint(1, V, (B, L), generator=g)}
    return {"input_features": torch.randn(B, 8, 16, generator=g, dtype=torch.float64), "labels": ids}


LEFT_OUT = {
    # OPT computes its positions from the attention mask inside its own embedding subclass.
    "opt": ({"model.decoder.embed_positions.weight"}, "OPTLearnedPositionalEmbedding"),
    # T5 shares one embedding between encoder, decoder and head; its relative position buckets are shared too.
    "t5": (
        {
            "shared.weight",
            *(f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight" for s in ("encoder", "decoder")),
        },
        "relative position buckets",
    ),
    # Whisper's decoder looks its positions up by keyword in an Embedding subclass.
    "whisper": ({"model.decoder.embed_positions.weight"}, "WhisperPositionalEmbedding"),
}


@pytest.mark.parametrize("name", ["opt", "t5", "whisper"])
def test_hugging_face_models_are_measured_with_what_is_left_out_named(name):
    model = _hf(name)
    batches = [_hf_batch(name, s) for s in range(3)]
    m, ours = _train_with_clipping(model, batches, lambda mod, b: mod(**b).loss, B)
    left_out, reason = LEFT_OUT[name]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    measured = {n for n in m.layers}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert m.status == "ok", m.undefined_reason
    assert trainable - measured == left_out - frozen
    assert len(ours) == 1 and reason in ours[0]

    collector = ExampleCollector(model, on_unsupported="ignore", keep_per_example=True)
    batch = _hf_batch(name, 9)
    model(**batch).loss.backward()
    collector.collect(B)
    got = collector.per_example_sq_norms()
    ref = torch_func_sq_norms(model, batch)
    assert set(got) == trainable - left_out
    _assert_exact(got, ref, rtol=1e-6)
