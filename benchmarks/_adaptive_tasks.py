"""The two workloads of ``adaptive.py``: the digits MLP (SGD with momentum) and the byte-level transformer (AdamW).

Each is built from a seed: the model's initial weights, the data split and the sampler's order follow from it.
A workload says how its learning rate follows the batch (``lr_rule``, from ``lr_ref`` at ``batch_ref``), which
batch sizes the fixed sweep covers, the training loss to reach and the examples budget at which held-out losses
are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.controllers.rules import LrRule


@dataclass
class Problem:
    """One seeded instance: the model, its optimizer, how to fetch a batch and the two losses."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    n_train: int
    fetch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_loss: Callable[[], float]
    heldout_loss: Callable[[], float]
    on_unsupported: str = "error"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    make: Callable[[int, float], Problem]
    lr_rule: LrRule
    lr_ref: float
    batch_ref: int
    sweep: tuple[int, ...]
    target_loss: float
    budget: int  # examples at which held-out losses are compared
    max_examples: int  # a run that has not reached the target by then counts as not reaching it
    eval_examples: int  # evaluate the training loss every this many examples
    ramp: tuple[int, int, int]  # linear ramp: from, to, over examples
    gns: dict[str, Any]  # the gns controller's settings (min_batch, max_batch, k, dwell, ...)
    halflife: float  # the monitor's smoothing half-life in examples
    seeds: int  # default number of seeds (runs to the target vary by 10-30% between seeds on digits)
    adam: bool = False  # trained with an Adam-family optimizer: Adam's preconditioned noise scale applies


# -- digits: MLP 64-512-512-10, SGD with momentum 0.9 ---------------------------------------------------------------

DIGITS_TRAIN = 1500


def make_digits(seed: int, lr: float) -> Problem:
    from noisescale.demo.digits import load_digits_tensors

    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))  # one split for every seed
    x_train, y_train = x[perm[:DIGITS_TRAIN]], y[perm[:DIGITS_TRAIN]]
    x_test, y_test = x[perm[DIGITS_TRAIN:]], y[perm[DIGITS_TRAIN:]]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    @torch.no_grad()
    def loss_on(xs: torch.Tensor, ys: torch.Tensor) -> float:
        return F.cross_entropy(model(xs), ys).item()

    return Problem(
        model=model,
        optimizer=opt,
        n_train=DIGITS_TRAIN,
        fetch=lambda idx: (x_train[idx], y_train[idx]),
        loss=F.cross_entropy,
        train_loss=lambda: loss_on(x_train, y_train),
        heldout_loss=lambda: loss_on(x_test, y_test),
    )


DIGITS = Workload(
    name="digits",
    description="MLP 64-512-512-10 on scikit-learn digits (1,500 train / 297 held out), SGD momentum 0.9",
    make=make_digits,
    lr_rule="linear",
    lr_ref=0.08,
    batch_ref=32,
    sweep=(16, 32, 64, 128, 256),
    target_loss=0.01,
    budget=16_000,
    max_examples=60_000,
    eval_examples=256,
    ramp=(16, 256, 16_000),
    gns={"min_batch": 16, "max_batch": 512, "quantize": "pow2"},
    halflife=1_000.0,
    seeds=8,
)


# -- charlm: 2-block byte-level transformer on the standard library, AdamW ------------------------------------------


def make_charlm(seed: int, lr: float) -> Problem:
    from noisescale.demo.charlm import CONTEXT, VOCAB, CharLM, load_corpus

    corpus = load_corpus()
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    offsets = torch.arange(CONTEXT + 1)

    def windows(source: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = source[starts[:, None] + offsets]  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    g = torch.Generator().manual_seed(99)  # the same evaluation windows for every seed
    train_eval = windows(train, torch.randint(0, len(train) - CONTEXT - 1, (256,), generator=g))
    held_eval = windows(held, torch.randint(0, len(held) - CONTEXT - 1, (256,), generator=g))
    torch.manual_seed(seed)
    model = CharLM(width=64, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    @torch.no_grad()
    def loss_on(xy: tuple[torch.Tensor, torch.Tensor]) -> float:
        return loss(model(xy[0]), xy[1]).item()

    return Problem(
        model=model,
        optimizer=opt,
        n_train=len(train) - CONTEXT - 1,  # an example is the window starting at one position
        fetch=lambda idx: windows(train, torch.tensor(idx)),
        loss=loss,
        train_loss=lambda: loss_on(train_eval),
        heldout_loss=lambda: loss_on(held_eval),
        on_unsupported="ignore",
    )


CHARLM = Workload(
    name="charlm",
    description="byte-level transformer (2 blocks, width 64, context 64) on Python's stdlib sources, AdamW",
    make=make_charlm,
    lr_rule="sqrt",
    lr_ref=4e-3,
    batch_ref=16,
    sweep=(8, 16, 32, 64, 128),
    target_loss=2.2,
    budget=6_000,
    max_examples=40_000,
    eval_examples=512,
    ramp=(8, 128, 8_000),
    gns={"min_batch": 8, "max_batch": 256, "quantize": "pow2"},
    halflife=2_000.0,
    seeds=3,
    adam=True,
)

WORKLOADS = {w.name: w for w in (DIGITS, CHARLM)}
