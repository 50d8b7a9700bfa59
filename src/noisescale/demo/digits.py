"""The default demo: a small MLP on scikit-learn's bundled handwritten digits (8x8 images, 10 classes, no download).

Plain SGD (lr 0.2, batch 128, 800 steps) on 1,500 training images (297 held out).  With the default seed B_simple
starts in the tens, below the batch size, and grows about ninefold to several hundred as the loss falls, the
range and trend McCandlish et al. (2018) report for MNIST.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.demo.task import DemoError, EpochSampler, Task

__all__ = ["DEFAULTS", "make_digits_task"]

DEFAULTS = {"steps": 800, "batch_size": 128, "lr": 0.2, "hidden": 128}
N_TRAIN = 1500


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as ``(x: (N, 64) float32 in [0, 1], y: (N,) int64)``; needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DemoError(
            "the digits demo needs scikit-learn: pip install 'noisescale[demo]' "
            "(or run `noisescale demo --task charlm`, which needs nothing extra)"
        ) from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def make_digits_task(
    *, seed: int, lr: float | None = None, hidden: int | None = None, noisy_labels: float | None = None
) -> Task:
    lr = DEFAULTS["lr"] if lr is None else lr
    hidden = int(DEFAULTS["hidden"] if hidden is None else hidden)
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x_train, y_train = x[perm[:N_TRAIN]], y[perm[:N_TRAIN]]
    x_test, y_test = x[perm[N_TRAIN:]], y[perm[N_TRAIN:]]
    flipped = None
    if noisy_labels:
        from noisescale.demo.noisy import flip_labels

        y_train, flipped = flip_labels(y_train, noisy_labels, classes=10, seed=seed)

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    for layer in model:
        if isinstance(layer, nn.Linear):  # He initialisation for ReLU layers: no plateau at the start
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    sampler = EpochSampler(N_TRAIN, g)

    last: list[torch.Tensor] = []

    def batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = sampler.next(batch_size)
        last[:] = [idx]
        return x_train[idx], y_train[idx]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits = model(x_test)
        return {
            "test_loss": F.cross_entropy(logits, y_test).item(),
            "test_accuracy": (logits.argmax(1) == y_test).float().mean().item(),
        }

    return Task(
        name="digits",
        title=f"MLP 64-{hidden}-{hidden}-10 on scikit-learn digits, SGD lr {lr:g}",
        model=model,
        optimizer=optimizer,
        batch=batch,
        loss=F.cross_entropy,
        evaluate=evaluate,
        threads=1,
        config={"model": f"mlp-64-{hidden}-{hidden}-10", "optimizer": "sgd", "lr": lr, "train_examples": N_TRAIN},
        batch_ids=lambda: last[0],
        flipped=None if flipped is None else flipped.tolist(),
    )
