"""Window dot products: the QK(+RPB) forward, d(attn) of the AV backward, and dRPB.

``window_dot``: ``out[b, i, h, t] = scale * <x[b, i, h], y[b, nb(i, t), h]> (+ rpb[h, rel(i, t)])``
for every query ``i`` and window slot ``t``; unused causal slots get ``-inf`` (logits) or ``0``
(gradients). QK forward is ``x = query, y = key``; the AV backward's d(attn) is
``x = grad_out, y = value``.

dRPB, the sum of the logits gradient per bias bin, is ``rpb_kernels.rpb_grad``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import triton_geometry as tg
from ..triton_utils import Padded3
from .common import launch_rows, tuned


@triton.jit
def split_index(n, L1, L2):
    """Row-major flat token index -> (axis 0, axis 1, axis 2) coordinates."""
    i2 = n % L2
    i1 = (n // L2) % L1
    i0 = n // (L1 * L2)
    return i0, i1, i2


@triton.jit
def row_tile(N, L1, L2, H, BLOCK_N: tl.constexpr):
    """This program's batch and head (int64) and its ``BLOCK_N`` flat tokens: in-range mask, coordinates.

    The row kernels' grid is ``(cdiv(N, BLOCK_N), batch * heads)``.
    """
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i0, i1, i2 = split_index(n, L1, L2)
    return b, h, n < N, i0, i1, i2


@triton.jit
def rpb_bin(i0, i1, i2, j0, j1, j2, D0, D1, D2, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Flat index into ``rpb[h].view(-1)`` of key ``j`` for query ``i``."""
    r0 = tg.rpb_offset(i0, j0, K0, D0)
    r1 = tg.rpb_offset(i1, j1, K1, D1)
    r2 = tg.rpb_offset(i2, j2, K2, D2)
    return (r0 * (2 * K1 - 1) + r1) * (2 * K2 - 1) + r2


@tuned("unfused_window_dot", dtype_of="x_ptr")
@triton.jit
def _window_dot_kernel(
    x_ptr, y_ptr, rpb_ptr, out_ptr,
    sxb, sx0, sx1, sx2, sxh, sxd,
    syb, sy0, sy1, sy2, syh, syd,
    sob, so0, so1, so2, soh, sod,
    L0, L1, L2, D0, D1, D2, N, H, scale,
    head_dim: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, FILL_NEG_INF: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    CHUNK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, n_mask, i0, i1, i2 = row_tile(N, L1, L2, H, BLOCK_N)
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        (sx0, sx1, sx2, sxh, sxd, sy0, sy1, sy2, syh, syd, so0, so1, so2, soh, sod) = tg.int64_strides(
            (sx0, sx1, sx2, sxh, sxd, sy0, sy1, sy2, syh, syd, so0, so1, so2, soh, sod))
    start0 = tg.window_start(i0, L0, K0, D0, C0)
    start1 = tg.window_start(i1, L1, K1, D1, C1)
    start2 = tg.window_start(i2, L2, K2, D2, C2)
    x_rows = x_ptr + b * sxb + h * sxh + (i0 * sx0 + i1 * sx1 + i2 * sx2)
    y_base = y_ptr + b * syb + h * syh
    o_rows = out_ptr + b * sob + h * soh + (i0 * so0 + i1 * so1 + i2 * so2)
    lanes = tl.arange(0, CHUNK_D)
    if head_dim <= CHUNK_D:  # one chunk: load the query rows once, not once per slot
        x_mask = n_mask[:, None] & (lanes < head_dim)[None, :]
        x_tile = tl.load(x_rows[:, None] + lanes[None, :] * sxd, mask=x_mask, other=0.0).to(tl.float32)
    for t in range(K0 * K1 * K2):
        j0 = start0 + (t // (K1 * K2)) * D0
        j1 = start1 + ((t // K2) % K1) * D1
        j2 = start2 + (t % K2) * D2
        used = tg.slot_valid(i0, j0, C0) & tg.slot_valid(i1, j1, C1) & tg.slot_valid(i2, j2, C2)
        y_rows = y_base + (j0 * sy0 + j1 * sy1 + j2 * sy2)
        if head_dim <= CHUNK_D:
            yv = tl.load(y_rows[:, None] + lanes[None, :] * syd, mask=x_mask & used[:, None], other=0.0)
            acc = tl.sum(x_tile * yv.to(tl.float32), axis=1)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, head_dim, CHUNK_D):
                d = d0 + lanes
                tile_mask = n_mask[:, None] & (d < head_dim)[None, :]
                xv = tl.load(x_rows[:, None] + d[None, :] * sxd, mask=tile_mask, other=0.0).to(tl.float32)
                yv = tl.load(y_rows[:, None] + d[None, :] * syd, mask=tile_mask & used[:, None], other=0.0)
                acc += tl.sum(xv * yv.to(tl.float32), axis=1)
        acc = acc * scale
        if HAS_RPB:
            r = rpb_bin(i0, i1, i2, j0, j1, j2, D0, D1, D2, K0, K1, K2)
            bias = tl.load(rpb_ptr + h * ((2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)) + r, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)
        if FILL_NEG_INF:
            acc = tl.where(used, acc, float("-inf"))
        else:
            acc = tl.where(used, acc, 0.0)
        tl.store(o_rows + t * sod, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def window_dot(x: torch.Tensor, y: torch.Tensor, rpb: torch.Tensor | None, geo: Padded3, scale: float,
               fill_neg_inf: bool, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` ``[B, *spatial, H, K]`` with the window dot products (see module doc)."""
    if out.numel() == 0:
        return out
    rpb_arg = rpb.contiguous() if rpb is not None else None  # HAS_RPB off: the kernel never touches it
    launch_rows(_window_dot_kernel,
                lambda x, y, out: dict(x_ptr=x, y_ptr=y, rpb_ptr=rpb_arg, out_ptr=out,
                                       **geo.stride_args(x=x, y=y, o=out)),
                (x, y, out), x, out, geo, scale, HAS_RPB=rpb is not None, FILL_NEG_INF=fill_neg_inf)
    return out
