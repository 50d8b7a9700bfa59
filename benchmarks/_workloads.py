"""The CPU workloads of ``overhead.py``: an MLP and a CNN on sklearn's digits and three tiny causal transformers;
``scaling.py`` adds a U-Net denoiser and a grid of transformer shapes.

Each is built from a seed, so every mode (and every memory-probe subprocess) starts from the same initial
parameters and sees the same fixed batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
N_BATCHES = 8  # distinct fixed batches, cycled while timing
N_MICRO = 4  # micro-batches of the accumulation modes


@dataclass(frozen=True)
class Workload:
    """A model factory, fixed batches and the loss.

    Attributes:
        name: key used on the command line and in the JSON.
        description: one line for the table.
        make_model: builds the model (call under a fixed seed, or load ``initial_state``).
        batches: ``N_BATCHES`` pairs ``(inputs, targets)``.
        n_classes: size of the last logits dimension.
        float_input: inputs are floating point (cast to float64 for the exact reference).
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    n_classes: int
    float_input: bool
    regression: bool = False  # the loss is the mean squared error against float targets (the denoiser)

    @property
    def batch_size(self) -> int:
        return int(self.batches[0][0].shape[0])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over examples (and over tokens: every sequence has the same length); mean squared
        error for a regression workload."""
        if self.regression:
            return F.mse_loss(logits, targets)
        return F.cross_entropy(logits.reshape(-1, self.n_classes), targets.reshape(-1))

    def flat(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, targets)`` in the 2-D / 1-D shapes ``nn.CrossEntropyLoss`` takes."""
        return logits.reshape(-1, self.n_classes), targets.reshape(-1)

    def initial_state(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(SEED)
        return {k: v.detach().clone() for k, v in self.make_model().state_dict().items()}

    def n_params(self) -> int:
        return sum(p.numel() for p in self.make_model().parameters())


# -- (a) MLP 64-512-512-10 on sklearn digits -------------------------------------------------------------------


def _make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def mlp_digits() -> Workload:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xs = torch.tensor(x / 16.0, dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(SEED))
    b = 128
    batches = []
    for i in range(N_BATCHES):
        idx = order[i * b : (i + 1) * b]
        batches.append((xs[idx].contiguous(), ys[idx].contiguous()))
    return Workload(
        name="mlp_digits",
        description="MLP 64-512-512-10 ReLU, sklearn digits (X/16), batch 128, CE mean, SGD",
        make_model=_make_mlp,
        batches=batches,
        n_classes=10,
        float_input=True,
    )


# -- (a') a small CNN on the same digits ------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (1 -> 16 -> 32 channels) on the 8x8 digits, a 2x2 max-pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


def cnn_digits() -> Workload:
    mlp = mlp_digits()
    return Workload(
        name="cnn_digits",
        description="CNN conv 1-16-32 (3x3, same) + max-pool + linear, sklearn digits 8x8, batch 128, CE mean, SGD",
        make_model=DigitsCNN,
        batches=mlp.batches,
        n_classes=10,
        float_input=True,
    )


# -- (b) 2-block causal transformer on random tokens -----------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3d) -> three (B, heads, T, d/heads)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no mask buffer: Opacus strict mode
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def embed_tokens(tok: nn.Embedding, pos: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """Token plus learned position embeddings of ``idx`` ``(B, T)``.

    Position ids as a contiguous ``(B, T)`` tensor, so every per-example method sees a batch dimension (Opacus'
    ghost Embedding sampler fails on an ``expand()``ed, non-contiguous one).
    """
    b, t = idx.shape
    return tok(idx) + pos(torch.arange(t, device=idx.device).repeat(b, 1))


class TinyGPT(nn.Module):
    """Pre-LayerNorm GPT: token + position embeddings, ``n_layer`` blocks, final LayerNorm, untied head."""

    def __init__(self, vocab: int = 96, ctx: int = 64, d: int = 128, heads: int = 4, n_layer: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = embed_tokens(self.tok, self.pos, idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _random_tokens(name: str, description: str, make_model: Callable[[], nn.Module], seed: int) -> Workload:
    """A next-token workload on random tokens: vocabulary 96, context 64, batch 32 (both transformers)."""
    vocab, ctx, b = 96, 64, 32
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, vocab, (b, ctx + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return Workload(
        name=name,
        description=description,
        make_model=make_model,
        batches=batches,
        n_classes=vocab,
        float_input=False,
    )


def tiny_transformer() -> Workload:
    return _random_tokens(
        "tiny_transformer",
        "causal transformer, 2 pre-LN blocks, d=128, 4 heads, MLP 4x, LayerNorm, context 64, vocab 96, "
        "random tokens, batch 32, next-token CE mean, SGD",
        lambda: TinyGPT(vocab=96, ctx=64),
        SEED + 1,
    )


# -- (c) 2-block Llama-style transformer: RMSNorm, separate q/k/v/o, gated MLP ---------------------------------


class LlamaAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z(x).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = LlamaAttention(d, heads)
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """Llama's layer types (RMSNorm, bias-free separate q/k/v/o, SwiGLU) with learned positions instead of RoPE."""

    def __init__(self, vocab: int = 96, ctx: int = 64, d: int = 128, heads: int = 4, n_layer: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads, hidden=344) for _ in range(n_layer))  # 8d/3, rounded
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = embed_tokens(self.tok, self.pos, idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_llama() -> Workload:
    return _random_tokens(
        "tiny_llama",
        "Llama-style causal transformer, 2 blocks, d=128, 4 heads, separate q/k/v/o, SwiGLU 344, RMSNorm, "
        "context 64, vocab 96, random tokens, batch 32, next-token CE mean, SGD",
        lambda: TinyLlama(vocab=96, ctx=64),
        SEED + 2,
    )


# -- (d) the same shape built from torch's own nn.TransformerEncoderLayer (nn.MultiheadAttention inside) ----------


class TorchEncoderLM(nn.Module):
    """``nn.TransformerEncoder`` of pre-LN layers under a causal mask: attention by ``nn.MultiheadAttention``."""

    def __init__(self, vocab: int = 96, ctx: int = 64, d: int = 128, heads: int = 4, n_layer: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", torch.ones(ctx, ctx, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.encoder(embed_tokens(self.tok, self.pos, idx), mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.ln_f(x))


def torch_encoder() -> Workload:
    return _random_tokens(
        "torch_encoder",
        "causal nn.TransformerEncoder, 2 pre-LN layers (nn.MultiheadAttention), d=128, 4 heads, MLP 4x, "
        "context 64, vocab 96, random tokens, batch 32, next-token CE mean, SGD",
        lambda: TorchEncoderLM(vocab=96, ctx=64),
        SEED + 3,
    )


# -- (e) a small U-Net-style diffusion denoiser (benchmarks/scaling.py) --------------------------------------------


class _ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 convolution, plus the time embedding; twice; a 1x1 convolution on the skip if needed."""

    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(t)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TinyUNet(nn.Module):
    """A DDPM-style denoiser of 16x16 one-channel images: two resolutions down (stride-2 convolutions), a middle
    block, two up (nearest upsampling, concatenated skips), residual blocks with GroupNorm and a time embedding.

    The input packs the noisy image and the noise level: ``(B, 256 + 1)``; the output is the predicted noise.
    """

    def __init__(self, ch: int = 32, t_dim: int = 64) -> None:
        super().__init__()
        self.t_mlp = nn.Sequential(nn.Linear(1, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(1, ch, 3, padding=1)
        self.down1, self.ds1 = _ResBlock(ch, ch, t_dim), nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2, self.ds2 = _ResBlock(ch, 2 * ch, t_dim), nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * ch, 2 * ch, t_dim)
        self.up2 = _ResBlock(4 * ch, ch, t_dim)
        self.up1 = _ResBlock(2 * ch, ch, t_dim)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        x, t = packed[:, :256].reshape(-1, 1, 16, 16), packed[:, 256:]
        temb = self.t_mlp(t)
        h0 = self.down1(self.inc(x), temb)  # (B, ch, 16, 16)
        h1 = self.down2(self.ds1(h0), temb)  # (B, 2ch, 8, 8)
        h = self.mid(self.ds2(h1), temb)  # (B, 2ch, 4, 4)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), h1], 1), temb)  # (B, ch, 8, 8)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), h0], 1), temb)  # (B, ch, 16, 16)
        return self.out(F.silu(h)).flatten(1)


def unet_denoiser(batch: int = 64) -> Workload:
    """Digits upsampled to 16x16 in [-1, 1], noised as ``sqrt(1 - s) x + sqrt(s) e`` at a random level ``s``; the
    target is the noise ``e`` (mean squared error)."""
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    images = torch.tensor(x / 8.0 - 1.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(images), generator=gen)
    batches = []
    for i in range(N_BATCHES):
        x0 = images[order[i * batch : (i + 1) * batch]].flatten(1)
        level = torch.rand(batch, 1, generator=gen)
        noise = torch.randn(batch, 256, generator=gen)
        noisy = (1 - level).sqrt() * x0 + level.sqrt() * noise
        batches.append((torch.cat([noisy, level], 1), noise))
    return Workload(
        name="unet_denoiser",
        description=f"U-Net denoiser, 16x16 digits, channels 32-64, GroupNorm, time embedding, batch {batch}, MSE, SGD",
        make_model=TinyUNet,
        batches=batches,
        n_classes=0,
        float_input=True,
        regression=True,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp_digits": mlp_digits,
    "cnn_digits": cnn_digits,
    "tiny_transformer": tiny_transformer,
    "tiny_llama": tiny_llama,
    "torch_encoder": torch_encoder,
}
