"""Fused NA backward, deterministic (no atomics anywhere).

Two passes, each recomputing the probabilities from the saved logsumexp:

* ``_na_bwd_dq_kernel`` (query-centric, same tiles and halos as the forward): computes
  ``delta = rowsum(dO * O) - dLSE`` for its tile (stored for the second pass), ``dQ``, and -- with an
  RPB -- this tile's partial ``dRPB``: the block of ``dS`` is gathered (``tl.gather``) from halo
  order into relative-position order and summed over the tile's queries. Every (tile, batch, head)
  writes its own row of partials, which the host sums in a fixed order.
* ``_na_bwd_dkdv_kernel`` (key-centric): a tile of keys walks the union of its keys' inverse
  neighbourhoods (a box, see ``_tiles.key_halo``) and accumulates ``dK`` and ``dV`` in registers.
"""

import triton
import triton.language as tl

from ..triton_geometry import window_start
from . import config
from ._tiles import halo_block, halo_flat, in_window, mma, key_halo, query_halo, rpb_index, split_program, tile_block


@triton.jit
def _na_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, do_ptr, lse_ptr, dlse_ptr,
    dq_ptr, delta_ptr, drpb_ptr,
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    sdob, sdo0, sdo1, sdo2, sdoh, sdod,
    sgb, sg0, sg1, sg2, sgh, sgd,
    slb, sl0, sl1, sl2, slh,
    L0, L1, L2, D0, D1, D2, H, head_dim, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ (strides ``sg*``), delta and dRPB partials; ``lse``/``dlse``/``delta`` share strides ``sl*``.

    Program axis 2 picks a chunk of ``BLOCK_R`` relative positions (more than one chunk only for
    big windows, e.g. 3-D k=5); chunk 0 stores dQ and delta.
    """
    BLOCK_Q: tl.constexpr = T0 * T1 * T2
    tile_id = tl.program_id(0)
    g0, g1, g2, a0, a1, a2 = split_program(tile_id, L0, L1, L2, D0, D1, D2, T0, T1, T2)
    bh = tl.program_id(1)
    chunk = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    if (a0 * D0 + g0 >= L0) | (a1 * D1 + g1 >= L1) | (a2 * D2 + g2 >= L2):
        return

    i0, i1, i2, q_valid = tile_block(a0, a1, a2, g0, g1, g2, L0, L1, L2, D0, D1, D2, T0, T1, T2)
    ws0 = window_start(i0, L0, K0, D0, C0)
    ws1 = window_start(i1, L1, K1, D1, C1)
    ws2 = window_start(i2, L2, K2, D2, C2)

    dim = tl.arange(0, BLOCK_D)
    d_valid = dim < head_dim
    qd_mask = q_valid[:, None] & d_valid[None, :]
    q_off = b * sqb + i0 * sq0 + i1 * sq1 + i2 * sq2 + h * sqh
    q = tl.load((q_ptr + q_off)[:, None] + (dim * sqd)[None, :], mask=qd_mask, other=0.0)
    o_off = b * sob + i0 * so0 + i1 * so1 + i2 * so2 + h * soh
    o = tl.load((o_ptr + o_off)[:, None] + (dim * sod)[None, :], mask=qd_mask, other=0.0)
    do_off = b * sdob + i0 * sdo0 + i1 * sdo1 + i2 * sdo2 + h * sdoh
    do = tl.load((do_ptr + do_off)[:, None] + (dim * sdod)[None, :], mask=qd_mask, other=0.0)
    l_off = b * slb + i0 * sl0 + i1 * sl1 + i2 * sl2 + h * slh
    lse2 = tl.load(lse_ptr + l_off, mask=q_valid, other=0.0) * 1.4426950408889634
    # d(loss)/d(logit) = P * (dP - delta); an incoming dLSE adds P * dLSE, i.e. lowers delta.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + l_off, mask=q_valid, other=0.0)
    if chunk == 0:
        tl.store(delta_ptr + l_off, delta, mask=q_valid)

    h0, n0 = query_halo(a0, g0, L0, D0, K0, C0, T0)
    h1, n1 = query_halo(a1, g1, L1, D1, K1, C1, T1)
    h2, n2 = query_halo(a2, g2, L2, D2, K2, C2, T2)
    halo = n0 * n1 * n2

    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    R: tl.constexpr = (2 * K0 - 1) * R1 * R2
    rpb_row = rpb_ptr + h * R
    if HAS_RPB:
        # For query q and relative position r: the key at that offset, its flat halo index, and
        # whether it is in q's window (each (q, r) then lives in exactly one halo block).
        r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
        jr0 = i0[:, None] + ((r // (R1 * R2))[None, :] - (K0 - 1)) * D0
        jr1 = i1[:, None] + (((r // R2) % R1)[None, :] - (K1 - 1)) * D1
        jr2 = i2[:, None] + ((r % R2)[None, :] - (K2 - 1)) * D2
        r_valid = (in_window(i0[:, None], ws0[:, None], jr0, D0, K0, C0)
                   & in_window(i1[:, None], ws1[:, None], jr1, D1, K1, C1)
                   & in_window(i2[:, None], ws2[:, None], jr2, D2, K2, C2)
                   & q_valid[:, None] & (r < R)[None, :])
        r_flat = halo_flat((jr0 - h0) // D0, (jr1 - h1) // D1, (jr2 - h2) // D2, n1, n2)
        drpb = tl.zeros([BLOCK_R], tl.float32)

    rpb_q = rpb_index(i0, i1, i2, h0, h1, h2, D0, D1, D2, K0, K1, K2)  # + halo step of the key
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
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
                & k_valid[None, :] & q_valid[:, None])
        s = mma(q, tl.trans(k), IEEE) * qk_scale
        if HAS_RPB:
            ri = rpb_q[:, None] + halo_flat(u0, u1, u2, R1, R2)[None, :]
            s += tl.load(rpb_row + ri, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
        p = tl.where(mask, tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, IEEE)
        if HAS_RPB:
            local = r_flat - start
            here = r_valid & (local >= 0) & (local < BLOCK_K)
            picked = tl.gather(ds, tl.minimum(tl.maximum(local, 0), BLOCK_K - 1), 1)
            drpb += tl.sum(tl.where(here, picked, 0.0), 0)

    if chunk == 0:
        dq_off = b * sgb + i0 * sg0 + i1 * sg1 + i2 * sg2 + h * sgh
        tl.store((dq_ptr + dq_off)[:, None] + (dim * sgd)[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=qd_mask)
    if HAS_RPB:
        n_chunks = tl.num_programs(2)
        row = (tile_id.to(tl.int64) * tl.num_programs(1) + bh) * n_chunks + chunk
        tl.store(drpb_ptr + row * BLOCK_R + tl.arange(0, BLOCK_R), drpb)


@triton.jit
def _na_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr,
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sgb, sg0, sg1, sg2, sgh, sgd,
    sdob, sdo0, sdo1, sdo2, sdoh, sdod,
    slb, sl0, sl1, sl2, slh,
    L0, L1, L2, D0, D1, D2, H, head_dim, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """dK, dV for a tile of keys (``sg*``: strides of the contiguous dk/dv)."""
    BLOCK_KT: tl.constexpr = T0 * T1 * T2
    g0, g1, g2, a0, a1, a2 = split_program(tl.program_id(0), L0, L1, L2, D0, D1, D2, T0, T1, T2)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    if (a0 * D0 + g0 >= L0) | (a1 * D1 + g1 >= L1) | (a2 * D2 + g2 >= L2):
        return

    j0, j1, j2, k_valid = tile_block(a0, a1, a2, g0, g1, g2, L0, L1, L2, D0, D1, D2, T0, T1, T2)

    dim = tl.arange(0, BLOCK_D)
    d_valid = dim < head_dim
    kd_mask = k_valid[:, None] & d_valid[None, :]
    k_off = b * skb + j0 * sk0 + j1 * sk1 + j2 * sk2 + h * skh
    k = tl.load((k_ptr + k_off)[:, None] + (dim * skd)[None, :], mask=kd_mask, other=0.0)
    v_off = b * svb + j0 * sv0 + j1 * sv1 + j2 * sv2 + h * svh
    v = tl.load((v_ptr + v_off)[:, None] + (dim * svd)[None, :], mask=kd_mask, other=0.0)

    h0, n0 = key_halo(a0, g0, L0, D0, K0, C0, T0)
    h1, n1 = key_halo(a1, g1, L1, D1, K1, C1, T1)
    h2, n2 = key_halo(a2, g2, L2, D2, K2, C2, T2)
    halo = n0 * n1 * n2

    rpb_row = rpb_ptr + h * ((2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1))
    # rpb_offset(i, j) = rpb_offset(halo start, j) - (halo step of query i).
    rpb_k = rpb_index(h0, h1, h2, j0, j1, j2, D0, D1, D2, K0, K1, K2)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_KT, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_KT, BLOCK_D], tl.float32)
    for start in range(0, halo, BLOCK_Q):
        q_valid, u0, u1, u2, i0, i1, i2 = halo_block(start, BLOCK_Q, halo, h0, h1, h2, n1, n2, D0, D1, D2)
        qd_mask = q_valid[:, None] & d_valid[None, :]
        q_off = b * sqb + i0 * sq0 + i1 * sq1 + i2 * sq2 + h * sqh
        q = tl.load((q_ptr + q_off)[:, None] + (dim * sqd)[None, :], mask=qd_mask, other=0.0)
        do_off = b * sdob + i0 * sdo0 + i1 * sdo1 + i2 * sdo2 + h * sdoh
        do = tl.load((do_ptr + do_off)[:, None] + (dim * sdod)[None, :], mask=qd_mask, other=0.0)
        l_off = b * slb + i0 * sl0 + i1 * sl1 + i2 * sl2 + h * slh
        lse2 = tl.load(lse_ptr + l_off, mask=q_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + l_off, mask=q_valid, other=0.0)
        ws0 = window_start(i0, L0, K0, D0, C0)
        ws1 = window_start(i1, L1, K1, D1, C1)
        ws2 = window_start(i2, L2, K2, D2, C2)

        # Transposed problem: rows are this tile's keys, columns the halo block's queries.
        mask = (in_window(i0[None, :], ws0[None, :], j0[:, None], D0, K0, C0)
                & in_window(i1[None, :], ws1[None, :], j1[:, None], D1, K1, C1)
                & in_window(i2[None, :], ws2[None, :], j2[:, None], D2, K2, C2)
                & q_valid[None, :] & k_valid[:, None])
        st = mma(k, tl.trans(q), IEEE) * qk_scale
        if HAS_RPB:
            ri = rpb_k[:, None] - halo_flat(u0, u1, u2, 2 * K1 - 1, 2 * K2 - 1)[None, :]
            st += tl.load(rpb_row + ri, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
        pt = tl.where(mask, tl.exp2(st - lse2[None, :]), 0.0)
        dv += mma(pt.to(do.dtype), do, IEEE)
        dpt = mma(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += mma(dst.to(q.dtype), q, IEEE)

    g_off = b * sgb + j0 * sg0 + j1 * sg1 + j2 * sg2 + h * sgh
    tl.store((dk_ptr + g_off)[:, None] + (dim * sgd)[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store((dv_ptr + g_off)[:, None] + (dim * sgd)[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


na_bwd_dq_kernel = config.autotuned(_na_bwd_dq_kernel, "BLOCK_K", "fused_bwd_dq",
                                    outputs=("dq_ptr", "delta_ptr", "drpb_ptr"))
na_bwd_dkdv_kernel = config.autotuned(_na_bwd_dkdv_kernel, "BLOCK_Q", "fused_bwd_dkdv", outputs=("dk_ptr", "dv_ptr"))
