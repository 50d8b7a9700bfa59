"""Sketched per-example squared norms: unbiased estimates from random projections, drawn afresh each step.

For one example's weight gradient ``W`` (``n x m``) and a random ``R`` (``m x k``) with independent ``N(0, 1)``
entries, ``E |W R|^2 / k = tr(W E[R R^T] W^T) / k = |W|^2``: an unbiased estimate of the squared norm from ``k``
projections, of variance ``2 |W^T W|_F^2 / k`` (at most ``2 |W|^4 / k``, much less for a gradient of high rank).
The two-batch estimator is linear in the per-example squared norms (McCandlish et al. 2018, App. A), so its
estimates of ``|G|^2`` and ``tr(Sigma)`` stay unbiased with sketched norms in place of exact ones.

* ``nn.Linear`` on sequences: ``W_i = G_i^T X_i`` with ``X_i`` the ``(T, m)`` inputs and ``G_i`` the ``(T, n)``
  output gradients, so ``W_i R = G_i^T (X_i R)``: ``B T k (m + n)`` multiply-adds instead of the Gram form's
  ``B T^2 (m + n)`` or the materialised ``B T m n``.  The larger of the two sides is projected (the smaller buffer,
  ``(B, min(m, n), k)``); layers that read one input share its projection, like the Gram matrices.
* Convolutions: the patch side is projected by convolving the input with ``k`` random kernels (the layer's own
  stride, padding and dilation), so no im2col copy is made: ``B L k (C_in K + C_out)``.
* ``nn.Embedding``: the vocabulary side, by a count sketch (each token id gets a random sign and one of ``k``
  buckets): ``O(B T D)``, no sort.  ``E[s(u) s(v) [h(u) = h(v)]] = [u = v]``, so the estimate is unbiased too.

The projections are fresh each step (the generator is seeded from the step number, so a run is reproducible and
every rank draws the same ones): the sketch's error is then independent from step to step, and the moving average
of the raw estimates, whose spread the band measures, already carries its variance.

A sketch replaces an exact form only where it costs at most half as much (``PAYS``); everywhere else the norms stay
exact.  The collector makes a ``Sketch`` current around its hooks (``use_sketch``), like the ``GramCache``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["PAYS", "Sketch", "current_sketch", "use_sketch"]

PAYS = 0.5
"""A sketch replaces an exact form when its multiply-adds are at most this share of the exact form's."""

_SEED = 0x5EED_5EED


def _mix(seed: int, step: int) -> int:
    """A 63-bit seed for ``step`` (splitmix64's finaliser: neighbouring steps get unrelated streams)."""
    z = (seed + 0x9E3779B97F4A7C15 * (step + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class Sketch:
    """``k`` random projections per layer, drawn afresh each step from a generator of the sketch's own.

    The user's random number generators are never touched.  ``begin(step)`` reseeds from the step number; the
    layers then draw in the order their hooks run.

    Args:
        k: projections per layer (the estimate's relative variance is at most ``2 / k``).
        seed: the base seed (one run's projections are reproducible; two sketches with one seed draw alike).
    """

    def __init__(self, k: int, *, seed: int = _SEED) -> None:
        self.k = int(k)
        self.seed = int(seed)
        self.step = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seeded: set[torch.device] = set()
        # the last projected input: (weak reference, version, projection, projected input)
        self._entry: tuple[weakref.ref[torch.Tensor], int, torch.Tensor, torch.Tensor] | None = None

    def begin(self, step: int) -> None:
        """Start drawing the projections of optimizer step ``step``."""
        self.step = int(step)
        self._seeded.clear()
        self._entry = None

    def generator(self, device: torch.device) -> torch.Generator:
        """This step's generator on ``device`` (seeded on first use in the step)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        if device not in self._seeded:
            gen.manual_seed(_mix(self.seed, self.step))
            self._seeded.add(device)
        return gen

    def gaussian(self, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(rows, k)`` independent standard normal entries."""
        return torch.randn(rows, self.k, generator=self.generator(device), device=device, dtype=dtype)

    def kernels(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Independent standard normal entries of ``shape`` (random convolution kernels)."""
        return torch.randn(shape, generator=self.generator(device), device=device, dtype=dtype)

    def count_sketch(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random sign (``+-1``, float32) and one of ``k`` buckets (int64) for each of ``vocab`` ids."""
        gen = self.generator(device)
        bucket = torch.randint(0, self.k, (vocab,), generator=gen, device=device)
        sign = torch.randint(0, 2, (vocab,), generator=gen, device=device, dtype=torch.float32).mul_(2.0).sub_(1.0)
        return sign, bucket

    def projected(self, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """``x R`` for ``x`` of shape ``(..., m)``: the projection of a layer's input, shared with the next layer
        that reads the same tensor ``source`` in this step (query, key and value projections)."""
        entry = self._entry
        if source is not None and entry is not None and entry[0]() is source and entry[1] == source._version:
            if entry[2].shape[0] == x.shape[-1] and entry[3].shape[:-1] == x.shape[:-1]:
                return entry[3]
        r = self.gaussian(x.shape[-1], x.device, x.dtype)
        xr = torch.matmul(x, r)
        if source is not None:
            self._entry = (weakref.ref(source), source._version, r, xr)
        return xr


_CURRENT: ContextVar[Sketch | None] = ContextVar("noisescale_sketch", default=None)


def current_sketch() -> Sketch | None:
    """The sketch the rules may use now, if the collector made one current."""
    return _CURRENT.get()


@contextmanager
def use_sketch(sketch: Sketch | None) -> Iterator[None]:
    """Make ``sketch`` current around a rule call (``None``: exact norms)."""
    token = _CURRENT.set(sketch)
    try:
        yield
    finally:
        _CURRENT.reset(token)
