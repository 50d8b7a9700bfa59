"""``--task charlm``: a tiny causal transformer on bytes of the Python standard library's own source files.

Every machine with Python has that corpus (found next to the ``os`` module), so nothing is downloaded.  Two
pre-norm blocks, width 64, 4 heads, context 64, a byte vocabulary of 256; AdamW.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.demo.task import DemoError, Task

__all__ = ["DEFAULTS", "CharLM", "load_corpus", "make_charlm_task"]

DEFAULTS = {"steps": 300, "batch_size": 32, "lr": 3e-3, "width": 64}
CONTEXT = 64
VOCAB = 256
CORPUS_BYTES = 2_000_000


def load_corpus(max_bytes: int = CORPUS_BYTES) -> bytes:
    """Up to ``max_bytes`` of the standard library's top-level ``*.py`` files, in sorted order (deterministic)."""
    root = Path(os.path.dirname(os.__file__))
    chunks: list[bytes] = []
    total = 0
    try:
        files = sorted(p for p in root.glob("*.py") if p.is_file())
    except OSError:
        files = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 100_000:
        raise DemoError(
            f"found only {len(corpus):,} bytes of Python source in {str(root)!r} for the charlm corpus "
            "(this Python ships without its standard library sources); use the default digits task"
        )
    return corpus


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP, each with a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, c/heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    """Byte-level causal language model: ``(B, T) int64 -> (B, T, 256)`` logits."""

    def __init__(self, width: int = 128, heads: int = 4, blocks: int = 2, context: int = CONTEXT) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(blocks)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        for name, p in self.named_parameters():
            if name.endswith("out.weight") or name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * blocks))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        # Positions as a (B, T) batch, not (T,): per-example hooks need the batch dimension on every layer.
        pos = torch.arange(t, device=idx.device).expand(b, t)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln(self.blocks(x)))


def make_charlm_task(*, seed: int, lr: float | None = None, width: int | None = None) -> Task:
    lr = DEFAULTS["lr"] if lr is None else lr
    width = int(DEFAULTS["width"] if width is None else width)
    corpus = load_corpus()
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CharLM(width=width, heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def windows(source: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(CONTEXT + 1)
        chunk = source[starts[:, None] + offsets]  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(train) - CONTEXT - 1, (batch_size,), generator=g)
        return windows(train, starts)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    eval_starts = torch.randint(0, len(held) - CONTEXT - 1, (256,), generator=torch.Generator().manual_seed(seed + 1))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        x, y = windows(held, eval_starts)
        return {"test_loss": loss(model(x), y).item()}

    n_params = sum(p.numel() for p in model.parameters())
    return Task(
        name="charlm",
        title=f"byte-level transformer (2 blocks, width {width}, 4 heads) on Python's stdlib; "
        f"an example is one {CONTEXT}-byte sequence",
        model=model,
        optimizer=optimizer,
        batch=batch,
        loss=loss,
        evaluate=evaluate,
        on_unsupported="ignore",
        threads=1,
        config={
            "model": f"charlm-2x{width}",
            "parameters": n_params,
            "optimizer": "adamw",
            "lr": lr,
            "context": CONTEXT,
            "corpus_bytes": len(corpus),
        },
    )
