"""Fused NA forward: one program = one multi-dimensional query tile x one (batch, head).

The tile's key/value halo is walked in flat blocks of ``BLOCK_K`` keys on a compile-time pitch
(``P1``, ``P2``, see ``_tiles.halo_steps``); logits ``scale*q.k + rpb`` are masked per query to its
own window (a compare pair per axis, in halo steps) and folded into an online softmax (fp32,
base 2). Nothing of size [N, K] is ever written: the outputs are ``out`` and the per-query
logsumexp.
"""

import triton
import triton.language as tl

from ..triton_geometry import int64_strides, subgrid_length
from ..triton_utils import LN2, LOG2E
from . import config
from ._tiles import (halo_rows, halo_steps, mma, query_tile_axis, rpb_steps, split_program, tile_steps, walk_length,
                     window_logits)


@triton.jit
def _na_fwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, lse_ptr,
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    slb, sl0, sl1, sl2, slh,
    L0, L1, L2, D0, D1, D2, H, head_dim, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    P1: tl.constexpr, P2: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    FLAT0: tl.constexpr = (T0 == 1) and (K0 == 1)  # halo step 0 throughout: dropped at trace time
    FLAT1: tl.constexpr = (T1 == 1) and (K1 == 1)
    R: tl.constexpr = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    g0, g1, g2, a0, a1, a2 = split_program(tl.program_id(0), L0, L1, L2, D0, D1, D2, T0, T1, T2)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        (sq0, sq1, sq2, sqh, sqd, sk0, sk1, sk2, skh, skd, sv0, sv1, sv2, svh, svd,
         so0, so1, so2, soh, sod, sl0, sl1, sl2, slh) = int64_strides(
            (sq0, sq1, sq2, sqh, sqd, sk0, sk1, sk2, skh, skd, sv0, sv1, sv2, svh, svd,
             so0, so1, so2, soh, sod, sl0, sl1, sl2, slh))
    n_sub0 = subgrid_length(g0, L0, D0)
    n_sub1 = subgrid_length(g1, L1, D1)
    n_sub2 = subgrid_length(g2, L2, D2)
    # Empty tile of a smaller dilation group: nothing to do.
    if (a0 >= n_sub0) | (a1 >= n_sub1) | (a2 >= n_sub2):
        return

    # Queries (sub-grid coordinates), the halo box (first key, extent) and each query's window
    # [lo, hi] in halo steps, per axis (a query past the sub-grid computes a window it never stores).
    t0, t1, t2 = tile_steps(T0, T1, T2)
    ip0, hs0, n0, lo0, hi0 = query_tile_axis(a0, t0, n_sub0, K0, C0, T0)
    ip1, hs1, n1, lo1, hi1 = query_tile_axis(a1, t1, n_sub1, K1, C1, T1)
    ip2, hs2, n2, lo2, hi2 = query_tile_axis(a2, t2, n_sub2, K2, C2, T2)
    q_valid = (ip0 < n_sub0) & (ip1 < n_sub1) & (ip2 < n_sub2)

    dim = tl.arange(0, BLOCK_D)
    d_valid = dim < head_dim
    q_off = (b * sqb + h * sqh + (ip0 * D0 + g0) * sq0 + (ip1 * D1 + g1) * sq1 + (ip2 * D2 + g2) * sq2)
    q = tl.load((q_ptr + q_off)[:, None] + (dim * sqd)[None, :], mask=q_valid[:, None] & d_valid[None, :], other=0.0)

    # K/V of the halo: first token, then a stride per halo step along each axis.
    k_row = k_ptr + b * skb + h * skh + (hs0 * D0 + g0) * sk0 + (hs1 * D1 + g1) * sk1 + (hs2 * D2 + g2) * sk2
    v_row = v_ptr + b * svb + h * svh + (hs0 * D0 + g0) * sv0 + (hs1 * D1 + g1) * sv1 + (hs2 * D2 + g2) * sv2
    # RPB entry of (query, halo key u) = entry of (query, halo start) + rpb_steps(u). Without an RPB
    # rpb_ptr is None, and window_logits never reads it.
    rpb_row = rpb_ptr
    if HAS_RPB:
        rpb_row = rpb_ptr + h * R
    rpb_q = rpb_steps(hs0 - ip0 + K0 - 1, hs1 - ip1 + K1 - 1, hs2 - ip2 + K2 - 1, K1, K2)

    qk_scale = scale * LOG2E  # base-2 softmax
    inv_scale = 1.0 / scale
    m_i = tl.full([T0 * T1 * T2], -1.0e30, tl.float32)
    l_i = tl.zeros([T0 * T1 * T2], tl.float32)
    acc = tl.zeros([T0 * T1 * T2, BLOCK_D], tl.float32)
    for start in range(0, walk_length(n0, n1, n2, P1, P2), BLOCK_K):
        u0, u1, u2 = halo_steps(start, BLOCK_K, FLAT0, FLAT1, P1, P2)
        k = halo_rows(k_row, u0, u1, u2, n0, n1, n2, D0, D1, D2, sk0, sk1, sk2, skd, dim, d_valid, FLAT0, FLAT1)
        v = halo_rows(v_row, u0, u1, u2, n0, n1, n2, D0, D1, D2, sv0, sv1, sv2, svd, dim, d_valid, FLAT0, FLAT1)
        # scale * (q.k + rpb / scale): the bias enters as the product's accumulator.
        s, mask = window_logits(q, k, u0, u1, u2, lo0, lo1, lo2, hi0, hi1, hi2, rpb_row, rpb_q, inv_scale,
                                K1, K2, R, FLAT0, FLAT1, HAS_RPB, IEEE)
        s = tl.where(mask, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_off = b * sob + h * soh + (ip0 * D0 + g0) * so0 + (ip1 * D1 + g1) * so1 + (ip2 * D2 + g2) * so2
    tl.store((o_ptr + o_off)[:, None] + (dim * sod)[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_valid[:, None] & d_valid[None, :])
    lse = (m_i + tl.log2(l_safe)) * LN2
    l_off = b * slb + h * slh + (ip0 * D0 + g0) * sl0 + (ip1 * D1 + g1) * sl1 + (ip2 * D2 + g2) * sl2
    tl.store(lse_ptr + l_off, lse, mask=q_valid)


na_fwd_kernel = config.autotuned(_na_fwd_kernel, "BLOCK_K", "fused_fwd", outputs=("o_ptr", "lse_ptr"))
