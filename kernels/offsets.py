"""How wide the Triton kernels' memory offsets are, and how their grids fit CUDA's limits.

Both Triton backends add a batch element's offset in int64 (``b * stride_b`` with ``b`` int64) and
build every offset *inside* a batch element from int32 coordinates and strides: 32-bit products
take one register and one instruction where 64-bit ones take two or more, and these kernels are
bound by integer instruction issue (``docs/kernel_audit.md``). An int32 offset is wrong once a
batch element spans 2^31 elements or more (e.g. a 64x256x256 video map with 16 heads of 128), so
the decision is made per launch, on the host, from shapes and strides: a problem that needs it
gets a separate compile-time specialisation (``INT64_OFFSETS``) whose kernels turn their strides
(``triton_geometry.int64_strides``) into int64 once, in the prologue, so that every offset product
is 64-bit. Every other problem compiles exactly as before. Plain Python: importable without Triton.

Triton itself passes an int argument of 2^31 or more as int64, so a huge stride or axis length is
never truncated; what wraps without this module is a product of two int32 values.
"""

from __future__ import annotations

import os

import torch

INT32_MAX = 2**31 - 1
# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1 programs).
MAX_GRID_Y = 65535
# "1": every launch takes the 64-bit specialisation (tests, the kernel audit of its cost).
FORCE_ENV = "DINAT_INT64_OFFSETS"


def element_span(x: torch.Tensor | None) -> int:
    """Largest element offset reachable inside one batch element of ``x`` (every axis but the
    first): ``sum((size - 1) * |stride|)``; 0 for an empty tensor or ``None``. Shapes and strides
    only: works on meta and fake tensors and on expanded views without touching memory."""
    if x is None or x.numel() == 0:
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]))


def int64_offsets(*tensors: torch.Tensor | None, indices: int = 0) -> bool:
    """Whether a launch over these ``[B, ...]`` tensors needs 64-bit offsets inside a batch element:
    one of them spans more than ``INT32_MAX`` elements there, or ``indices`` (the largest other
    index the kernel builds in int32, e.g. a flat token index) exceeds it."""
    if os.environ.get(FORCE_ENV, "0") == "1":
        return True
    return max(indices, *(element_span(t) for t in tensors)) > INT32_MAX


def heads_limit_reason(heads: int) -> str | None:
    """Why ``heads`` cannot launch (one program per (batch, head) on grid axis 1, and a batch
    element's heads in one launch), or None."""
    if heads > MAX_GRID_Y:
        return f"heads must be <= {MAX_GRID_Y} (CUDA's limit on grid axis 1); got {heads}"
    return None


def batch_chunks(batch: int, heads: int, backend: str) -> list[tuple[int, int]]:
    """``[start, stop)`` batch ranges launched one after another, so that each launch's
    ``batch * heads`` programs fit CUDA's grid axis 1 (``MAX_GRID_Y``); one range normally."""
    reason = heads_limit_reason(heads)
    if reason is not None:
        raise ValueError(f"backend={backend!r}: {reason}")
    per_launch = max(1, MAX_GRID_Y // max(heads, 1))
    return [(start, min(start + per_launch, batch)) for start in range(0, batch, per_launch)] or [(0, batch)]


def batch_slices(tensors: tuple, batch: int, heads: int, backend: str) -> list[tuple[int, tuple]]:
    """``(batch count, tensors[start:stop])`` per launch of ``batch_chunks``; the tensors
    themselves, not views of them, when one launch takes the whole batch."""
    chunks = batch_chunks(batch, heads, backend)
    if len(chunks) == 1:
        return [(batch, tensors)]
    return [(stop - start, tuple(t[start:stop] for t in tensors)) for start, stop in chunks]

