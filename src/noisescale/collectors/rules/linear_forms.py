"""The forms of per-example ``|sum_t g_t x_t^T|_F^2`` (a linear map over positions), each in bounded memory.

For ``x: (B, T, m)`` inputs and ``g: (B, T, n)`` output gradients (``nn.Linear`` on sequences, a convolution's
patches, an attention projection):

* ``ghost_sq_norms``: ``sum_{t,s} (x_t . x_s)(g_t . g_s)`` from two ``(T, T)`` Gram matrices per example,
  ``B T^2 (m + n)`` multiply-adds;
* ``materialised_sq_norms``: the per-example gradient ``G_i^T X_i``, ``(n, m)``, and its norm, ``B T m n``;
* ``sketched_sq_norms``: an unbiased estimate from ``k`` random projections (``rules.sketch``), ``B T k (m + n)``.

None allocates more than ``MAX_BUFFER`` elements at once: beyond it the work is cut into chunks of examples (and
of rows within an example when one example alone exceeds it), so a long context or a wide layer costs a few more
launches, never an out-of-memory error.  A ``(B, d_out, d_in)`` buffer would be about 1.4 GB per layer in float32
at ``B = 8`` for Llama-7B's 4096 x 11008 projections.  Half-precision inputs (autocast) go into the products as
they are, summed in float32 (``bmm_float``).
"""

from __future__ import annotations

import torch

from noisescale.collectors.rules.common import bmm_float
from noisescale.collectors.rules.sketch import Sketch

__all__ = [
    "CPU_WORKING_SET",
    "MAX_BUFFER",
    "chunk_size",
    "ghost_sq_norms",
    "materialised_sq_norms",
    "sketched_sq_norms",
]

MAX_BUFFER = 1 << 24
"""Elements of the largest temporary a form allocates (64 MiB in float32); more is computed in chunks."""

CPU_WORKING_SET = 1 << 17
"""Elements of one chunk's per-example buffer in the forms that run on a CPU only (``conv``'s grouped form).

glibc's allocator hands a freed block at the top of its heap back to the system once the free space there passes
its trim threshold (twice the largest mapped block freed so far, a few MiB in a small model), and the next
call faults those pages in again, zeroed.  On the digits CNN the per-example weight gradients of the second
convolution, 2.4 MiB twice over plus the kernel's own reorders, went that way on every step: 6.5 ms a call
against 1.9 ms with the pages kept; chunks of 512 KiB stay under the threshold and keep them.
"""


def chunk_size(per_item: int, limit: int) -> int:
    """How many items of ``per_item`` elements fit in ``limit`` (at least one)."""
    return max(1, limit // max(per_item, 1))


def ghost_sq_norms(x: torch.Tensor, g: torch.Tensor, *, gram_x: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example ``sum_{t,s} (x_t . x_s)(g_t . g_s)``, ``(B,)``, from Gram matrices, in chunks.

    Args:
        x: ``(B, T, m)``.
        g: ``(B, T, n)``.
        gram_x: ``x``'s ``(B, T, T)`` Gram matrix when it is already known (shared by layers that read one input).
    """
    b, t, _ = x.shape
    if gram_x is not None or 2 * b * t * t <= MAX_BUFFER:
        if gram_x is None:
            gram_x = bmm_float(x, x.transpose(1, 2))
        gram_g = bmm_float(g, g.transpose(1, 2))
        return gram_g.mul_(gram_x).sum(dim=(1, 2))
    out = []
    examples = chunk_size(2 * t * t, MAX_BUFFER)
    rows = t if examples > 1 or 2 * t * t <= MAX_BUFFER else chunk_size(2 * t, MAX_BUFFER)
    for i in range(0, b, examples):
        xi, gi = x[i : i + examples], g[i : i + examples]
        total = None
        for r in range(0, t, rows):  # rows r.. of the two Gram matrices, against every column
            part = bmm_float(gi[:, r : r + rows], gi.transpose(1, 2))
            part = part.mul_(bmm_float(xi[:, r : r + rows], xi.transpose(1, 2))).sum(dim=(1, 2))
            total = part if total is None else total.add_(part)
        assert total is not None
        out.append(total)
    return torch.cat(out)


def materialised_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example ``|G_i^T X_i|_F^2``, ``(B,)``, building each ``(n, m)`` gradient (in chunks of examples and rows)."""
    b, _, m = x.shape
    n = g.shape[-1]
    if b * n * m <= MAX_BUFFER:
        per_example = bmm_float(g.transpose(1, 2), x)  # (B, n, m)
        return torch.linalg.vector_norm(per_example, dim=(1, 2)).square()  # one pass, no temporary of squares
    examples = chunk_size(n * m, MAX_BUFFER)
    rows = n if examples > 1 or n * m <= MAX_BUFFER else chunk_size(m, MAX_BUFFER)
    out = []
    for i in range(0, b, examples):
        xi, gt = x[i : i + examples], g[i : i + examples].transpose(1, 2)
        total = None
        for r in range(0, n, rows):  # output rows r.. of each example's gradient
            part = torch.linalg.vector_norm(bmm_float(gt[:, r : r + rows], xi), dim=(1, 2)).square()
            total = part if total is None else total.add_(part)
        assert total is not None
        out.append(total)
    return torch.cat(out)


def sketched_sq_norms(
    x: torch.Tensor, g: torch.Tensor, sketch: Sketch, *, shared_input: torch.Tensor | None = None
) -> torch.Tensor:
    """An unbiased estimate of each example's ``|G_i^T X_i|_F^2`` from ``k`` random projections, ``(B,)``.

    The larger side is projected: ``|G_i^T (X_i R)|^2 / k`` for ``m >= n`` (the projection of the input shared with
    the next layer that reads ``shared_input``), else ``|(G_i L)^T X_i|^2 / k``.

    Args:
        x: ``(B, T, m)``.
        g: ``(B, T, n)``.
        sketch: the current step's projections.
        shared_input: the tensor ``x`` views (the layer's input as it came), to share its projection.
    """
    b, _, m = x.shape
    n = g.shape[-1]
    k = sketch.k
    if m >= n:
        xr = sketch.projected(x, shared_input)  # (B, T, k)
        left, right = g.transpose(1, 2), xr  # (B, n, T) @ (B, T, k)
        width = n
    else:
        gl = torch.matmul(g, sketch.gaussian(n, g.device, g.dtype))  # (B, T, k)
        left, right = gl.transpose(1, 2), x  # (B, k, T) @ (B, T, m)
        width = m
    examples = chunk_size(width * k, MAX_BUFFER)
    parts = [
        torch.linalg.vector_norm(bmm_float(left[i : i + examples], right[i : i + examples]), dim=(1, 2))
        for i in range(0, b, examples)
    ]
    norms = parts[0] if len(parts) == 1 else torch.cat(parts)
    return norms.square_().div_(k)
