"""Weighted sums over windows: the AV forward, dQ, and the inverse-neighbourhood dK / dV.

``window_sum``: ``out[b, i, h] = scale * sum_t w[b, i, h, t] * y[b, nb(i, t), h]`` (unused causal
slots skipped). AV forward is ``w = attn, y = value``; the QK backward's dQ is
``w = grad_logits, y = key``.

``inverse_sum``: ``out[b, j, h] = scale * sum over (i, t) with nb(i, t) = j of w[b, i, h, t] * x[b, i, h]``,
gathered per key ``j`` over its inverse neighbourhood (per axis, the queries
``inverse_first(j) + s * dilation`` for ``s < inverse_count(j)``), each output written by one
program in a fixed order: no atomics, bit-identical run to run. dK is ``w = grad_logits, x = query``;
dV is ``w = attn, x = grad_out``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import triton_geometry as tg
from ..triton_utils import Padded3
from .common import launch_rows, tuned
from .qk_kernels import row_tile


@tuned("unfused_window_sum", dtype_of="y_ptr")
@triton.jit
def _window_sum_kernel(
    w_ptr, y_ptr, out_ptr,
    swb, sw0, sw1, sw2, swh, swd,
    syb, sy0, sy1, sy2, syh, syd,
    sob, so0, so1, so2, soh, sod,
    L0, L1, L2, D0, D1, D2, N, H, scale,
    head_dim: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    CHUNK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, n_mask, i0, i1, i2 = row_tile(N, L1, L2, H, BLOCK_N)
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        (sw0, sw1, sw2, swh, swd, sy0, sy1, sy2, syh, syd, so0, so1, so2, soh, sod) = tg.int64_strides(
            (sw0, sw1, sw2, swh, swd, sy0, sy1, sy2, syh, syd, so0, so1, so2, soh, sod))
    start0 = tg.window_start(i0, L0, K0, D0, C0)
    start1 = tg.window_start(i1, L1, K1, D1, C1)
    start2 = tg.window_start(i2, L2, K2, D2, C2)
    w_rows = w_ptr + b * swb + h * swh + (i0 * sw0 + i1 * sw1 + i2 * sw2)
    y_base = y_ptr + b * syb + h * syh
    o_rows = out_ptr + b * sob + h * soh + (i0 * so0 + i1 * so1 + i2 * so2)
    lanes = tl.arange(0, CHUNK_D)
    for d0 in range(0, head_dim, CHUNK_D):
        d = d0 + lanes
        d_mask = d < head_dim
        acc = tl.zeros([BLOCK_N, CHUNK_D], dtype=tl.float32)
        for t in range(K0 * K1 * K2):
            j0 = start0 + (t // (K1 * K2)) * D0
            j1 = start1 + ((t // K2) % K1) * D1
            j2 = start2 + (t % K2) * D2
            used = n_mask & tg.slot_valid(i0, j0, C0) & tg.slot_valid(i1, j1, C1)
            used = used & tg.slot_valid(i2, j2, C2)
            wv = tl.load(w_rows + t * swd, mask=used, other=0.0).to(tl.float32)
            y_rows = y_base + (j0 * sy0 + j1 * sy1 + j2 * sy2)
            yv = tl.load(y_rows[:, None] + d[None, :] * syd, mask=used[:, None] & d_mask[None, :], other=0.0)
            acc += wv[:, None] * yv.to(tl.float32)
        acc = acc * scale
        tl.store(o_rows[:, None] + d[None, :] * sod, acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & d_mask[None, :])


def window_sum(w: torch.Tensor, y: torch.Tensor, geo: Padded3, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` ``[B, *spatial, H, D]`` with the window-weighted sums (see module doc)."""
    if out.numel() == 0:
        return out
    launch_rows(_window_sum_kernel,
                lambda w, y, out: dict(w_ptr=w, y_ptr=y, out_ptr=out, **geo.stride_args(w=w, y=y, o=out)),
                (w, y, out), y, out, geo, scale)
    return out


@tuned("unfused_inverse_sum", dtype_of="x_ptr")
@triton.jit
def _inverse_sum_kernel(
    w_ptr, x_ptr, out_ptr,
    swb, sw0, sw1, sw2, swh, swd,
    sxb, sx0, sx1, sx2, sxh, sxd,
    sob, so0, so1, so2, soh, sod,
    L0, L1, L2, D0, D1, D2, N, H, scale,
    head_dim: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    CHUNK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, n_mask, j0, j1, j2 = row_tile(N, L1, L2, H, BLOCK_N)  # the keys of this tile
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        (sw0, sw1, sw2, swh, swd, sx0, sx1, sx2, sxh, sxd, so0, so1, so2, soh, sod) = tg.int64_strides(
            (sw0, sw1, sw2, swh, swd, sx0, sx1, sx2, sxh, sxd, so0, so1, so2, soh, sod))
    first0 = tg.inverse_first(j0, L0, K0, D0, C0)
    first1 = tg.inverse_first(j1, L1, K1, D1, C1)
    first2 = tg.inverse_first(j2, L2, K2, D2, C2)
    count0 = tl.where(n_mask, tg.inverse_count(j0, L0, K0, D0, C0), 0)
    count1 = tl.where(n_mask, tg.inverse_count(j1, L1, K1, D1, C1), 0)
    count2 = tl.where(n_mask, tg.inverse_count(j2, L2, K2, D2, C2), 0)
    # Loop to the tile's longest run per axis; keys with shorter runs mask the extra steps.
    steps0 = tl.max(count0, axis=0)
    steps1 = tl.max(count1, axis=0)
    steps2 = tl.max(count2, axis=0)
    w_base = w_ptr + b * swb + h * swh
    x_base = x_ptr + b * sxb + h * sxh
    o_rows = out_ptr + b * sob + h * soh + (j0 * so0 + j1 * so1 + j2 * so2)
    lanes = tl.arange(0, CHUNK_D)
    for d0 in range(0, head_dim, CHUNK_D):
        d = d0 + lanes
        d_mask = d < head_dim
        acc = tl.zeros([BLOCK_N, CHUNK_D], dtype=tl.float32)
        # Offsets and slot indices are built up axis by axis, in the loop that fixes that axis.
        for s0 in range(0, steps0):
            i0 = first0 + s0 * D0
            in0 = s0 < count0
            slot0 = (j0 - tg.window_start(i0, L0, K0, D0, C0)) // D0 * K1
            w_off0 = i0 * sw0
            x_off0 = i0 * sx0
            for s1 in range(0, steps1):
                i1 = first1 + s1 * D1
                in01 = in0 & (s1 < count1)
                slot01 = (slot0 + (j1 - tg.window_start(i1, L1, K1, D1, C1)) // D1) * K2
                w_off01 = w_off0 + i1 * sw1
                x_off01 = x_off0 + i1 * sx1
                for s2 in range(0, steps2):
                    i2 = first2 + s2 * D2
                    hit = in01 & (s2 < count2)
                    t = slot01 + (j2 - tg.window_start(i2, L2, K2, D2, C2)) // D2
                    wv = tl.load(w_base + (w_off01 + i2 * sw2 + t * swd), mask=hit, other=0.0)
                    x_rows = x_base + (x_off01 + i2 * sx2)
                    xv = tl.load(x_rows[:, None] + d[None, :] * sxd, mask=hit[:, None] & d_mask[None, :], other=0.0)
                    acc += wv.to(tl.float32)[:, None] * xv.to(tl.float32)
        acc = acc * scale
        tl.store(o_rows[:, None] + d[None, :] * sod, acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & d_mask[None, :])


def inverse_sum(w: torch.Tensor, x: torch.Tensor, geo: Padded3, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` ``[B, *spatial, H, D]`` with the inverse-neighbourhood sums (see module doc)."""
    if out.numel() == 0:
        return out
    launch_rows(_inverse_sum_kernel,
                lambda w, x, out: dict(w_ptr=w, x_ptr=x, out_ptr=out, **geo.stride_args(w=w, x=x, o=out)),
                (w, x, out), x, out, geo, scale)
    return out
