"""Fused NA forward: one program = one multi-dimensional query tile x one (batch, head).

The tile's key/value halo is walked in flat blocks of ``BLOCK_K`` keys; logits ``scale*q.k + rpb``
are masked per query to its own window and folded into an online softmax (fp32, base 2). Nothing
of size [N, K] is ever written: the outputs are ``out`` and the per-query logsumexp.
"""

import triton
import triton.language as tl

from ..triton_geometry import window_start
from . import config
from ._tiles import halo_block, halo_flat, in_window, mma, query_halo, rpb_index, split_program, tile_block


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
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = T0 * T1 * T2
    g0, g1, g2, a0, a1, a2 = split_program(tl.program_id(0), L0, L1, L2, D0, D1, D2, T0, T1, T2)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    # Empty tile of a smaller dilation group: nothing to do.
    if (a0 * D0 + g0 >= L0) | (a1 * D1 + g1 >= L1) | (a2 * D2 + g2 >= L2):
        return

    i0, i1, i2, q_valid = tile_block(a0, a1, a2, g0, g1, g2, L0, L1, L2, D0, D1, D2, T0, T1, T2)
    ws0 = window_start(i0, L0, K0, D0, C0)
    ws1 = window_start(i1, L1, K1, D1, C1)
    ws2 = window_start(i2, L2, K2, D2, C2)

    dim = tl.arange(0, BLOCK_D)
    d_valid = dim < head_dim
    q_off = b * sqb + i0 * sq0 + i1 * sq1 + i2 * sq2 + h * sqh
    q = tl.load((q_ptr + q_off)[:, None] + (dim * sqd)[None, :], mask=q_valid[:, None] & d_valid[None, :], other=0.0)

    h0, n0 = query_halo(a0, g0, L0, D0, K0, C0, T0)
    h1, n1 = query_halo(a1, g1, L1, D1, K1, C1, T1)
    h2, n2 = query_halo(a2, g2, L2, D2, K2, C2, T2)
    halo = n0 * n1 * n2

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    rpb_row = rpb_ptr + h * ((2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1))
    rpb_q = rpb_index(i0, i1, i2, h0, h1, h2, D0, D1, D2, K0, K1, K2)  # + halo step of the key

    for start in range(0, halo, BLOCK_K):
        k_valid, u0, u1, u2, j0, j1, j2 = halo_block(start, BLOCK_K, halo, h0, h1, h2, n1, n2, D0, D1, D2)
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k_off = b * skb + j0 * sk0 + j1 * sk1 + j2 * sk2 + h * skh
        k = tl.load((k_ptr + k_off)[:, None] + (dim * skd)[None, :], mask=kv_mask, other=0.0)
        v_off = b * svb + j0 * sv0 + j1 * sv1 + j2 * sv2 + h * svh
        v = tl.load((v_ptr + v_off)[:, None] + (dim * svd)[None, :], mask=kv_mask, other=0.0)

        mask = (in_window(i0[:, None], ws0[:, None], j0[None, :], D0, K0, C0)
                & in_window(i1[:, None], ws1[:, None], j1[None, :], D1, K1, C1)
                & in_window(i2[:, None], ws2[:, None], j2[None, :], D2, K2, C2)
                & k_valid[None, :])
        s = mma(q, tl.trans(k), IEEE) * qk_scale
        if HAS_RPB:
            r = rpb_q[:, None] + halo_flat(u0, u1, u2, 2 * K1 - 1, 2 * K2 - 1)[None, :]
            s += tl.load(rpb_row + r, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_off = b * sob + i0 * so0 + i1 * so1 + i2 * so2 + h * soh
    tl.store((o_ptr + o_off)[:, None] + (dim * sod)[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_valid[:, None] & d_valid[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    l_off = b * slb + i0 * sl0 + i1 * sl1 + i2 * sl2 + h * slh
    tl.store(lse_ptr + l_off, lse, mask=q_valid)


na_fwd_kernel = config.autotuned(_na_fwd_kernel, "BLOCK_K", "fused_fwd", outputs=("o_ptr", "lse_ptr"))
