"""``noisescale demo --noisy-labels 0.05``: flip some training labels and show that their gradients stand out.

The digits task flips ``round(fraction * N)`` training labels to another digit, chosen with the seed; the loop
passes each batch's example ids to ``monitor.step(example_ids=...)``, which keeps every example's squared gradient
norm on sampled steps; the run records which labels were flipped (a ``"label_noise"`` event), so ``noisescale data
RUN`` ranks the examples and reports how many of the top ones are flipped.  A mislabelled example keeps a large
gradient for as long as the model has not memorised it, so it rises to the top.
"""

from __future__ import annotations

import torch

from noisescale.demo.task import DemoError

__all__ = ["SCORE_EVERY", "check_fraction", "flip_labels", "noisy_report"]

SCORE_EVERY = 2  # per-example scores on every other step: 400 steps of the default run


def check_fraction(fraction: float) -> float:
    if not (0.0 < fraction < 1.0):
        raise DemoError(
            f"--noisy-labels must be a fraction of the training labels in (0, 1), e.g. 0.05, got {fraction}"
        )
    return fraction


def flip_labels(y: torch.Tensor, fraction: float, *, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``y`` with ``round(fraction * len(y))`` labels changed to another class, and their indices (sorted).

    The indices and new labels come from a generator of their own (seeded from ``seed``), so the rest of the run
    (initialisation, batches) is the same as without flipped labels.
    """
    gen = torch.Generator().manual_seed(10_007 + seed)
    n = round(check_fraction(fraction) * len(y))
    idx = torch.randperm(len(y), generator=gen)[:n].sort().values
    out = y.clone()
    out[idx] = (y[idx] + torch.randint(1, classes, (n,), generator=gen)) % classes
    return out, idx


def noisy_report(data: dict[str, object]) -> str:
    """The demo's closing lines about the flipped labels (``store.data_summary`` of the run)."""
    ln = data.get("label_noise")
    top = data.get("top")
    if not isinstance(ln, dict) or not isinstance(top, list):
        return "no per-example scores were recorded"
    run = data.get("run")
    name = run.get("path") if isinstance(run, dict) else "RUN"
    return (
        f"flipped labels: {ln['flipped']} of the training examples have a wrong label. Ranked by how large their "
        f"gradient stays (each example's squared gradient norm over its step's mean, averaged over "
        f"{data.get('score_steps')} sampled steps), {ln['in_top']} of the top {len(top)} are flipped ones: "
        f"precision {ln['precision']:.2f}, recall {ln['recall']:.2f}.\n"
        f"the list: noisescale data {name}"
    )
