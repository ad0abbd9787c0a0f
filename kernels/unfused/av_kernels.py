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


@tuned("unfused_window_sum", dtype_of="y_ptr", has_rpb_arg=False)
@triton.jit
def _window_sum_kernel(
    w_ptr, y_ptr, out_ptr,
    w_sb, w_s0, w_s1, w_s2, w_sh, w_sk,
    y_sb, y_s0, y_s1, y_s2, y_sh, y_sd,
    o_sb, o_s0, o_s1, o_s2, o_sh, o_sd,
    L0, L1, L2, dil0, dil1, dil2, N, heads, scale,
    HEAD_DIM: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, n_mask, i0, i1, i2 = row_tile(N, L1, L2, heads, BLOCK_N)
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        w_s0, w_s1, w_s2, w_sh, w_sk = tg.int64_strides(w_s0, w_s1, w_s2, w_sh, w_sk)
        y_s0, y_s1, y_s2, y_sh, y_sd = tg.int64_strides(y_s0, y_s1, y_s2, y_sh, y_sd)
        o_s0, o_s1, o_s2, o_sh, o_sd = tg.int64_strides(o_s0, o_s1, o_s2, o_sh, o_sd)
    start0 = tg.window_start(i0, L0, K0, dil0, CAUSAL0)
    start1 = tg.window_start(i1, L1, K1, dil1, CAUSAL1)
    start2 = tg.window_start(i2, L2, K2, dil2, CAUSAL2)
    w_rows = w_ptr + b * w_sb + h * w_sh + (i0 * w_s0 + i1 * w_s1 + i2 * w_s2)
    y_base = y_ptr + b * y_sb + h * y_sh
    o_rows = out_ptr + b * o_sb + h * o_sh + (i0 * o_s0 + i1 * o_s1 + i2 * o_s2)
    lanes = tl.arange(0, BLOCK_D)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        d = d0 + lanes
        d_mask = d < HEAD_DIM
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for t in range(K0 * K1 * K2):
            j0 = start0 + (t // (K1 * K2)) * dil0
            j1 = start1 + ((t // K2) % K1) * dil1
            j2 = start2 + (t % K2) * dil2
            used = n_mask & tg.slot_valid(i0, j0, CAUSAL0) & tg.slot_valid(i1, j1, CAUSAL1)
            used = used & tg.slot_valid(i2, j2, CAUSAL2)
            wv = tl.load(w_rows + t * w_sk, mask=used, other=0.0).to(tl.float32)
            y_rows = y_base + (j0 * y_s0 + j1 * y_s1 + j2 * y_s2)
            yv = tl.load(y_rows[:, None] + d[None, :] * y_sd, mask=used[:, None] & d_mask[None, :], other=0.0)
            acc += wv[:, None] * yv.to(tl.float32)
        acc = acc * scale
        tl.store(o_rows[:, None] + d[None, :] * o_sd, acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & d_mask[None, :])


def window_sum(w: torch.Tensor, y: torch.Tensor, geo: Padded3, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` ``[B, *spatial, H, D]`` with the window-weighted sums (see module doc)."""
    if out.numel() == 0:
        return out
    launch_rows(_window_sum_kernel, lambda w, y, out: (w, y, out, *geo.strides(w), *geo.strides(y), *geo.strides(out)),
                (w, y, out), y, out, geo, scale)
    return out


@tuned("unfused_inverse_sum", dtype_of="x_ptr", has_rpb_arg=False)
@triton.jit
def _inverse_sum_kernel(
    w_ptr, x_ptr, out_ptr,
    w_sb, w_s0, w_s1, w_s2, w_sh, w_sk,
    x_sb, x_s0, x_s1, x_s2, x_sh, x_sd,
    o_sb, o_s0, o_s1, o_s2, o_sh, o_sd,
    L0, L1, L2, dil0, dil1, dil2, N, heads, scale,
    HEAD_DIM: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, n_mask, j0, j1, j2 = row_tile(N, L1, L2, heads, BLOCK_N)  # the keys of this tile
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        w_s0, w_s1, w_s2, w_sh, w_sk = tg.int64_strides(w_s0, w_s1, w_s2, w_sh, w_sk)
        x_s0, x_s1, x_s2, x_sh, x_sd = tg.int64_strides(x_s0, x_s1, x_s2, x_sh, x_sd)
        o_s0, o_s1, o_s2, o_sh, o_sd = tg.int64_strides(o_s0, o_s1, o_s2, o_sh, o_sd)
    first0 = tg.inverse_first(j0, L0, K0, dil0, CAUSAL0)
    first1 = tg.inverse_first(j1, L1, K1, dil1, CAUSAL1)
    first2 = tg.inverse_first(j2, L2, K2, dil2, CAUSAL2)
    count0 = tl.where(n_mask, tg.inverse_count(j0, L0, K0, dil0, CAUSAL0), 0)
    count1 = tl.where(n_mask, tg.inverse_count(j1, L1, K1, dil1, CAUSAL1), 0)
    count2 = tl.where(n_mask, tg.inverse_count(j2, L2, K2, dil2, CAUSAL2), 0)
    # Loop to the tile's longest run per axis; keys with shorter runs mask the extra steps.
    steps0 = tl.max(count0, axis=0)
    steps1 = tl.max(count1, axis=0)
    steps2 = tl.max(count2, axis=0)
    w_base = w_ptr + b * w_sb + h * w_sh
    x_base = x_ptr + b * x_sb + h * x_sh
    o_rows = out_ptr + b * o_sb + h * o_sh + (j0 * o_s0 + j1 * o_s1 + j2 * o_s2)
    lanes = tl.arange(0, BLOCK_D)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        d = d0 + lanes
        d_mask = d < HEAD_DIM
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Offsets and slot indices are built up axis by axis, in the loop that fixes that axis.
        for s0 in range(0, steps0):
            i0 = first0 + s0 * dil0
            in0 = s0 < count0
            slot0 = (j0 - tg.window_start(i0, L0, K0, dil0, CAUSAL0)) // dil0 * K1
            w_off0 = i0 * w_s0
            x_off0 = i0 * x_s0
            for s1 in range(0, steps1):
                i1 = first1 + s1 * dil1
                in01 = in0 & (s1 < count1)
                slot01 = (slot0 + (j1 - tg.window_start(i1, L1, K1, dil1, CAUSAL1)) // dil1) * K2
                w_off01 = w_off0 + i1 * w_s1
                x_off01 = x_off0 + i1 * x_s1
                for s2 in range(0, steps2):
                    i2 = first2 + s2 * dil2
                    hit = in01 & (s2 < count2)
                    t = slot01 + (j2 - tg.window_start(i2, L2, K2, dil2, CAUSAL2)) // dil2
                    wv = tl.load(w_base + (w_off01 + i2 * w_s2 + t * w_sk), mask=hit, other=0.0)
                    x_rows = x_base + (x_off01 + i2 * x_s2)
                    xv = tl.load(x_rows[:, None] + d[None, :] * x_sd, mask=hit[:, None] & d_mask[None, :], other=0.0)
                    acc += wv.to(tl.float32)[:, None] * xv.to(tl.float32)
        acc = acc * scale
        tl.store(o_rows[:, None] + d[None, :] * o_sd, acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & d_mask[None, :])


def inverse_sum(w: torch.Tensor, x: torch.Tensor, geo: Padded3, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` ``[B, *spatial, H, D]`` with the inverse-neighbourhood sums (see module doc)."""
    if out.numel() == 0:
        return out
    launch_rows(_inverse_sum_kernel, lambda w, x, out: (w, x, out, *geo.strides(w), *geo.strides(x), *geo.strides(out)),
                (w, x, out), x, out, geo, scale)
    return out
