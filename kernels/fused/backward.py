"""Fused NA backward, deterministic (no atomics anywhere).

Two passes, each recomputing the probabilities from the saved logsumexp:

* ``_na_bwd_dq_kernel`` (query-centric, same tiles and halos as the forward): computes
  ``delta = rowsum(dO * O) - dLSE`` for its tile (stored with ``lse * log2(e)`` as one 8-byte pair
  per query for the second pass, which gathers both per halo query), ``dQ``, and -- with an RPB --
  this tile's partial ``dRPB``: each block of ``dS`` is gathered (``tl.gather``) from walk order into
  (query, window slot) order and accumulated; after the walk the slots are mapped to relative
  positions once and summed over the tile's queries (2-D: two one-hot products on tensor cores).
  Every (tile, batch, head) writes its own row of partials, which the host sums in a fixed order.
* ``_na_bwd_dkdv_kernel`` (key-centric): a tile of keys walks the union of its keys' inverse
  neighbourhoods (a box, see ``_tiles.key_tile_axis``) and accumulates ``dK`` and ``dV`` in registers.
"""

import triton
import triton.language as tl

from ..triton_geometry import int64_strides, subgrid_window_start
from ..triton_utils import LOG2E
from . import config
from ._tiles import (batch_head, group_length, halo_offsets, halo_rows, halo_steps, in_range, key_tile_axis, mma,
                     mma_add, query_tile_axis, query_window, rpb_load, rpb_steps, signed, split_program, tile_steps,
                     walk_entry, walk_length, window_logits)


@triton.jit
def _na_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, do_ptr, lse_ptr, dlse_ptr,
    dq_ptr, stats_ptr, drpb_ptr,
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
    P1: tl.constexpr, P2: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_S: tl.constexpr, SLOT1: tl.constexpr, SLOT2: tl.constexpr,
    BLOCK_R1: tl.constexpr, BLOCK_R2: tl.constexpr, DRPB_BY_AXES: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ (strides ``sg*``), stats and dRPB partials; ``lse``/``dlse`` share strides ``sl*`` (contiguous:
    ``stats`` holds each query's ``(lse * log2(e), delta)`` at twice the offset).

    dRPB: during the walk, ``dS`` is accumulated per (query, window slot) (``BLOCK_S`` slots
    ``(s0 * SLOT1 + s1) * SLOT2 + s2``, a gather of ``BLOCK_S`` columns per block); after it, slots are
    mapped to relative positions once, into a row of ``(2 * K0 - 1) x BLOCK_R1 x BLOCK_R2`` bins:
    with ``DRPB_BY_AXES`` (2-D tiles, see ``ops._DrpbLayout``) by two small products, else by a
    gather per (query, bin).
    """
    FLAT0: tl.constexpr = (T0 == 1) and (K0 == 1)  # halo step 0 throughout: dropped at trace time
    FLAT1: tl.constexpr = (T1 == 1) and (K1 == 1)
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    R: tl.constexpr = (2 * K0 - 1) * R1 * R2
    tile_id = tl.program_id(0)
    g0, g1, g2, a0, a1, a2 = split_program(tile_id, L0, L1, L2, D0, D1, D2, T0, T1, T2)
    bh = tl.program_id(1)
    b, h = batch_head(bh, H)
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        (sq0, sq1, sq2, sqh, sqd, sk0, sk1, sk2, skh, skd, sv0, sv1, sv2, svh, svd,
         so0, so1, so2, soh, sod, sdo0, sdo1, sdo2, sdoh, sdod, sg0, sg1, sg2, sgh, sgd,
         sl0, sl1, sl2, slh) = int64_strides(
            (sq0, sq1, sq2, sqh, sqd, sk0, sk1, sk2, skh, skd, sv0, sv1, sv2, svh, svd,
             so0, so1, so2, soh, sod, sdo0, sdo1, sdo2, sdoh, sdod, sg0, sg1, sg2, sgh, sgd,
             sl0, sl1, sl2, slh))
    n_sub0 = signed(group_length(g0, L0, D0))
    n_sub1 = signed(group_length(g1, L1, D1))
    n_sub2 = signed(group_length(g2, L2, D2))
    if (a0 >= n_sub0) | (a1 >= n_sub1) | (a2 >= n_sub2):
        return

    t0, t1, t2 = tile_steps(T0, T1, T2)
    ip0, hs0, n0, lo0, hi0 = query_tile_axis(a0, t0, n_sub0, K0, C0, T0)
    ip1, hs1, n1, lo1, hi1 = query_tile_axis(a1, t1, n_sub1, K1, C1, T1)
    ip2, hs2, n2, lo2, hi2 = query_tile_axis(a2, t2, n_sub2, K2, C2, T2)
    q_valid = (ip0 < n_sub0) & (ip1 < n_sub1) & (ip2 < n_sub2)

    dim = tl.arange(0, BLOCK_D)
    d_valid = dim < head_dim
    qd_mask = q_valid[:, None] & d_valid[None, :]
    q_off = b * sqb + h * sqh + (ip0 * D0 + g0) * sq0 + (ip1 * D1 + g1) * sq1 + (ip2 * D2 + g2) * sq2
    q = tl.load((q_ptr + q_off)[:, None] + (dim * sqd)[None, :], mask=qd_mask, other=0.0)
    o_off = b * sob + h * soh + (ip0 * D0 + g0) * so0 + (ip1 * D1 + g1) * so1 + (ip2 * D2 + g2) * so2
    o = tl.load((o_ptr + o_off)[:, None] + (dim * sod)[None, :], mask=qd_mask, other=0.0)
    do_off = (b * sdob + h * sdoh + (ip0 * D0 + g0) * sdo0 + (ip1 * D1 + g1) * sdo1
              + (ip2 * D2 + g2) * sdo2)
    do = tl.load((do_ptr + do_off)[:, None] + (dim * sdod)[None, :], mask=qd_mask, other=0.0)
    l_off = b * slb + h * slh + (ip0 * D0 + g0) * sl0 + (ip1 * D1 + g1) * sl1 + (ip2 * D2 + g2) * sl2
    lse2 = tl.load(lse_ptr + l_off, mask=q_valid, other=0.0) * LOG2E
    # d(loss)/d(logit) = P * (dP - delta); an incoming dLSE adds P * dLSE, i.e. lowers delta.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + l_off, mask=q_valid, other=0.0)
    # One 8-byte pair per query for the key-centric pass, which gathers both per halo query.
    tl.store((stats_ptr + 2 * l_off)[:, None] + tl.arange(0, 2)[None, :], tl.join(lse2, delta),
             mask=q_valid[:, None])

    k_row = k_ptr + b * skb + h * skh + (hs0 * D0 + g0) * sk0 + (hs1 * D1 + g1) * sk1 + (hs2 * D2 + g2) * sk2
    v_row = v_ptr + b * svb + h * svh + (hs0 * D0 + g0) * sv0 + (hs1 * D1 + g1) * sv1 + (hs2 * D2 + g2) * sv2
    rpb_row = rpb_ptr  # None without an RPB: window_logits never reads it
    if HAS_RPB:
        rpb_row = rpb_ptr + h * R
    rpb_q = rpb_steps(hs0 - ip0 + K0 - 1, hs1 - ip1 + K1 - 1, hs2 - ip2 + K2 - 1, K1, K2)
    # dRPB by window class (1-D/2-D): a query's window holds K consecutive halo steps per axis, so
    # their residues modulo SLOT (a power of two >= K) are distinct, and dS is 0 outside the window:
    # summing each block's dS per (query, u1 % SLOT1, u2 % SLOT2) keeps every window slot apart with
    # no per-element index, and the slots are read back once, after the walk.
    # Applies to power-of-two slots and blocks whose columns are whole classes (the block, and in 2-D
    # the pitch, hold whole multiples of SLOT2); a block adds FOLD_ROWS halo rows at once.
    FOLD: tl.constexpr = (HAS_RPB and FLAT0 and (SLOT1 & (SLOT1 - 1)) == 0 and (SLOT2 & (SLOT2 - 1)) == 0
                          and BLOCK_K % SLOT2 == 0 and (FLAT1 or P2 % SLOT2 == 0))
    FOLD_ROWS: tl.constexpr = 1 if (FLAT1 or BLOCK_K <= P2) else min(BLOCK_K // P2, SLOT1)
    if FOLD:
        ds_classes = tl.zeros([T0 * T1 * T2, SLOT1 // FOLD_ROWS, FOLD_ROWS * SLOT2], tl.float32)
    elif HAS_RPB:
        # Window slot s of query q is walk entry walk_entry(lo(q)) + walk_entry(s's steps): the
        # gather of dS per (query, slot) is one add per element.
        slots = tl.arange(0, BLOCK_S)
        slot_entry = walk_entry(slots // (SLOT1 * SLOT2), (slots // SLOT2) % SLOT1, slots % SLOT2, FLAT0, FLAT1,
                                P1, P2)
        query_entry = walk_entry(lo0, lo1, lo2, FLAT0, FLAT1, P1, P2)
        ds_slots = tl.zeros([T0 * T1 * T2, BLOCK_S], tl.float32)

    qk_scale = scale * LOG2E  # base-2 softmax
    inv_scale = 1.0 / scale
    dq = tl.zeros([T0 * T1 * T2, BLOCK_D], tl.float32)
    for start in range(0, walk_length(n0, n1, n2, P1, P2), BLOCK_K):
        u0, u1, u2 = halo_steps(start, BLOCK_K, FLAT0, FLAT1, P1, P2)
        k = halo_rows(k_row, u0, u1, u2, n0, n1, n2, D0, D1, D2, sk0, sk1, sk2, skd, dim, d_valid, FLAT0, FLAT1)
        v = halo_rows(v_row, u0, u1, u2, n0, n1, n2, D0, D1, D2, sv0, sv1, sv2, svd, dim, d_valid, FLAT0, FLAT1)
        s, mask = window_logits(q, k, u0, u1, u2, lo0, lo1, lo2, hi0, hi1, hi2, rpb_row, rpb_q, inv_scale,
                                K1, K2, R, FLAT0, FLAT1, HAS_RPB, IEEE)
        p = tl.where(mask, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, IEEE)
        if FOLD:
            ds_classes += fold_block(ds, start, T0 * T1 * T2, BLOCK_K, P2, SLOT1, SLOT2, FOLD_ROWS)
        elif HAS_RPB:
            # Each (query, slot) lies in exactly one block of the walk.
            local = query_entry[:, None] + (slot_entry - start)[None, :]
            picked = tl.gather(ds, tl.minimum(local.to(tl.uint32, bitcast=True), BLOCK_K - 1).to(tl.int32), 1)
            ds_slots += tl.where((local >= 0) & (local < BLOCK_K), picked, 0.0)

    dq_off = b * sgb + h * sgh + (ip0 * D0 + g0) * sg0 + (ip1 * D1 + g1) * sg1 + (ip2 * D2 + g2) * sg2
    tl.store((dq_ptr + dq_off)[:, None] + (dim * sgd)[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=qd_mask)
    if FOLD:
        ds_slots = tl.reshape(ds_classes, [T0 * T1 * T2, SLOT1 * SLOT2])  # (query, class) from here on
    if HAS_RPB:
        row = drpb_ptr + (tile_id.to(tl.int64) * tl.num_programs(1) + bh) * ((2 * K0 - 1) * BLOCK_R1 * BLOCK_R2)
        if DRPB_BY_AXES:
            drpb = slots_to_bins_2d(ds_slots, a1, a2, hs1, hs2, n_sub1, n_sub2, K1, K2, C1, C2, T1, T2, SLOT1, SLOT2,
                                    BLOCK_R1, BLOCK_R2, FOLD)
            tl.store(row + tl.arange(0, BLOCK_R2)[:, None] + tl.arange(0, BLOCK_R1)[None, :] * BLOCK_R2, drpb)
        else:
            # Slot s of query q holds relative position r = s + e(q) per axis (e: the window's offset
            # from the query, shifted at the borders); sum over the tile's queries per r, one plane of
            # r0 at a time.
            e0 = lo0 + hs0 - ip0 + K0 - 1
            e1 = lo1 + hs1 - ip1 + K1 - 1
            e2 = lo2 + hs2 - ip2 + K2 - 1
            bins = tl.arange(0, BLOCK_R1 * BLOCK_R2)
            s1 = (bins // BLOCK_R2)[None, :] - e1[:, None]
            s2 = (bins % BLOCK_R2)[None, :] - e2[:, None]
            in_plane = (s1 >= 0) & (s1 < K1) & (s2 >= 0) & (s2 < K2) & q_valid[:, None]
            for r0 in tl.static_range(0, 2 * K0 - 1):
                s0 = r0 - e0[:, None]
                held = in_plane & (s0 >= 0) & (s0 < K0)
                if FOLD:  # the class of slot s: its halo step lo + s, modulo SLOT (K0 == 1: s0 == 0)
                    slot = ((lo1[:, None] + s1) & (SLOT1 - 1)) * SLOT2 + ((lo2[:, None] + s2) & (SLOT2 - 1))
                else:
                    slot = (s0 * SLOT1 + s1) * SLOT2 + s2
                slot = tl.where(held, slot, 0)
                drpb = tl.sum(tl.where(held, tl.gather(ds_slots, slot, 1), 0.0), 0)
                tl.store(row + r0 * (BLOCK_R1 * BLOCK_R2) + bins, drpb)


@triton.jit
def slots_to_bins_2d(ds_slots, a1, a2, first1, first2, n_sub1, n_sub2, K1: tl.constexpr, K2: tl.constexpr,
                     C1: tl.constexpr, C2: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, SLOT1: tl.constexpr,
                     SLOT2: tl.constexpr, BLOCK_R1: tl.constexpr, BLOCK_R2: tl.constexpr, BY_CLASS: tl.constexpr):
    """dRPB of a 2-D tile: ``[BLOCK_R2, BLOCK_R1]`` sums of ``dS`` per relative position ``(r1, r2)``.

    ``ds_slots`` is ``[T1 * T2, SLOT1 * SLOT2]`` (query ``(t1, t2)``, window slot ``(s1, s2)``, both
    row-major). Slot ``s`` of query ``t`` holds relative position ``r = s + e(t)`` per axis, and
    ``e`` along an axis depends on the query's coordinate along that axis only, so the map from
    (query, slot) to bins is separable: with one-hot matrices ``M_a[(t, s), r] = [r == s + e_a(t)]``
    the bins are ``(X @ M_2)^T @ M_1`` where ``X`` is ``ds_slots`` regrouped as
    ``[(t1, s1), (t2, s2)]`` -- two small products on tensor cores instead of a gather per
    (query, bin). With ``BY_CLASS`` the columns are window classes (halo step modulo ``SLOT``, see
    ``fold_block``) rather than slots; the one-hot maps take them to slots first.
    """
    x = tl.reshape(tl.permute(tl.reshape(ds_slots, [T1, T2, SLOT1, SLOT2]), [0, 2, 1, 3]),
                   [T1 * SLOT1, T2 * SLOT2])
    by_bin2 = one_hot_product(x, slot_bins(a2, first2, n_sub2, K2, C2, T2, SLOT2, BLOCK_R2, BY_CLASS))
    return one_hot_product(tl.trans(by_bin2), slot_bins(a1, first1, n_sub1, K1, C1, T1, SLOT1, BLOCK_R1, BY_CLASS))


@triton.jit
def slot_bins(a, first, length_g, K: tl.constexpr, C: tl.constexpr, T: tl.constexpr, SLOT: tl.constexpr,
              BLOCK_R: tl.constexpr, BY_CLASS: tl.constexpr):
    """One axis's ``[T * SLOT, BLOCK_R]`` one-hot map from (tile step ``t``, window slot ``s``) to the
    relative position ``s + e(t)`` (``e``: window start - query + K - 1); empty for slots past the
    window and for queries past the sub-grid. ``BY_CLASS``: the columns are classes ``c`` (halo step
    modulo ``SLOT``, ``first``: the halo's first key), slot ``s = (c - window start) mod SLOT``."""
    ts = tl.arange(0, T * SLOT)
    ip = a + ts // SLOT
    s = ts % SLOT
    start = subgrid_window_start(ip, length_g, K, C)
    if BY_CLASS:
        s = (s - (start - first)) & (SLOT - 1)
    rel = s + start - ip + (K - 1)
    rel = tl.where((s < K) & (ip < length_g), rel, -1)
    return (rel[:, None] == tl.arange(0, BLOCK_R)[None, :]).to(tl.float32)


@triton.jit
def fold_block(ds, start, Q: tl.constexpr, BLOCK_K: tl.constexpr, P2: tl.constexpr, SLOT1: tl.constexpr,
               SLOT2: tl.constexpr, ROWS: tl.constexpr):
    """A ``[Q, BLOCK_K]`` block of ``dS`` (walk entries ``start ..``) summed per window class
    ``(u1 % SLOT1, u2 % SLOT2)``, as ``[Q, SLOT1 // ROWS, ROWS * SLOT2]``.

    Column ``u2 % SLOT2`` is the entry's position modulo ``SLOT2`` in its row (the pitch is a multiple of
    ``SLOT2``): a reshape and a sum over whole groups of ``SLOT2`` columns, in registers. Rows: a block
    of ``ROWS`` halo rows (or part of one) starts at a row that is a multiple of ``ROWS``, so its rows
    fill one of the ``SLOT1 // ROWS`` groups of classes, chosen by a 0/1 weight per group. With
    ``ROWS == 1`` every entry of the block has the same row class (the block lies in one row, or
    ``SLOT1 == 1``), so the whole block is one run of columns (``P2`` is a multiple of ``SLOT2``).
    """
    WIDTH: tl.constexpr = BLOCK_K if ROWS == 1 else P2
    by_column = tl.sum(tl.reshape(ds, [Q, BLOCK_K // (WIDTH * ROWS), ROWS, WIDTH // SLOT2, SLOT2]), 3)
    by_class = tl.reshape(tl.sum(by_column, 1), [Q, 1, ROWS * SLOT2])
    if SLOT1 // ROWS > 1:
        group = ((start // P2) % SLOT1) // ROWS
        weight = (tl.arange(0, SLOT1 // ROWS) == group).to(tl.float32)
        by_class = by_class * weight[None, :, None]
    return by_class


@triton.jit
def one_hot_product(x, one_hot):
    """``x @ one_hot`` for fp32 ``x`` and a 0/1 ``one_hot``, to about fp32 accuracy on tensor cores:
    ``x`` split into its leading tf32 bits and the rest (exact in fp32; at most 13 significant bits,
    11 kept: relative error < 2^-21 per term), two tf32 products. (``input_precision="tf32x3"`` rounds both operands and takes three
    products: about 1,300 more SASS per program on Triton 3.6.)"""
    high = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.dot(x - high, one_hot, tl.dot(high, one_hot, input_precision="tf32"), input_precision="tf32")


@triton.jit
def _na_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, stats_ptr,
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
    P1: tl.constexpr, P2: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """dK, dV for a tile of keys (``sg*``: strides of the contiguous dk/dv)."""
    FLAT0: tl.constexpr = (T0 == 1) and (K0 == 1)  # halo step 0 throughout: dropped at trace time
    FLAT1: tl.constexpr = (T1 == 1) and (K1 == 1)
    R: tl.constexpr = (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    g0, g1, g2, a0, a1, a2 = split_program(tl.program_id(0), L0, L1, L2, D0, D1, D2, T0, T1, T2)
    bh = tl.program_id(1)
    b, h = batch_head(bh, H)
    if INT64_OFFSETS:  # a batch element spans 2^31 elements or more (kernels/offsets.py)
        (sq0, sq1, sq2, sqh, sqd, sk0, sk1, sk2, skh, skd, sv0, sv1, sv2, svh, svd,
         sdo0, sdo1, sdo2, sdoh, sdod, sg0, sg1, sg2, sgh, sgd, sl0, sl1, sl2, slh) = int64_strides(
            (sq0, sq1, sq2, sqh, sqd, sk0, sk1, sk2, skh, skd, sv0, sv1, sv2, svh, svd,
             sdo0, sdo1, sdo2, sdoh, sdod, sg0, sg1, sg2, sgh, sgd, sl0, sl1, sl2, slh))
    n_sub0 = signed(group_length(g0, L0, D0))
    n_sub1 = signed(group_length(g1, L1, D1))
    n_sub2 = signed(group_length(g2, L2, D2))
    if (a0 >= n_sub0) | (a1 >= n_sub1) | (a2 >= n_sub2):
        return

    # Keys (sub-grid coordinates), the query halo box (first query, extent) and each key's step
    # in it, per axis.
    t0, t1, t2 = tile_steps(T0, T1, T2)
    jp0, qs0, n0, v0 = key_tile_axis(a0, t0, n_sub0, K0, C0, T0)
    jp1, qs1, n1, v1 = key_tile_axis(a1, t1, n_sub1, K1, C1, T1)
    jp2, qs2, n2, v2 = key_tile_axis(a2, t2, n_sub2, K2, C2, T2)
    k_valid = (jp0 < n_sub0) & (jp1 < n_sub1) & (jp2 < n_sub2)

    dim = tl.arange(0, BLOCK_D)
    d_valid = dim < head_dim
    kd_mask = k_valid[:, None] & d_valid[None, :]
    k_off = b * skb + h * skh + (jp0 * D0 + g0) * sk0 + (jp1 * D1 + g1) * sk1 + (jp2 * D2 + g2) * sk2
    k = tl.load((k_ptr + k_off)[:, None] + (dim * skd)[None, :], mask=kd_mask, other=0.0)
    v_off = b * svb + h * svh + (jp0 * D0 + g0) * sv0 + (jp1 * D1 + g1) * sv1 + (jp2 * D2 + g2) * sv2
    v = tl.load((v_ptr + v_off)[:, None] + (dim * svd)[None, :], mask=kd_mask, other=0.0)

    # Q, dO, LSE, delta of the halo: first token, then a stride per halo step along each axis.
    q_row = q_ptr + b * sqb + h * sqh + (qs0 * D0 + g0) * sq0 + (qs1 * D1 + g1) * sq1 + (qs2 * D2 + g2) * sq2
    do_row = (do_ptr + b * sdob + h * sdoh + (qs0 * D0 + g0) * sdo0 + (qs1 * D1 + g1) * sdo1
              + (qs2 * D2 + g2) * sdo2)
    l_row = b * slb + h * slh + (qs0 * D0 + g0) * sl0 + (qs1 * D1 + g1) * sl1 + (qs2 * D2 + g2) * sl2
    # RPB entry of (halo query u, key) = entry of (halo start, key) - rpb_steps(u).
    if HAS_RPB:  # else rpb_ptr is None
        rpb_row = rpb_ptr + h * R
    rpb_k = rpb_steps(v0 + K0 - 1, v1 + K1 - 1, v2 + K2 - 1, K1, K2)

    qk_scale = scale * LOG2E  # base-2 softmax
    inv_scale = 1.0 / scale
    dk = tl.zeros([T0 * T1 * T2, BLOCK_D], tl.float32)
    dv = tl.zeros([T0 * T1 * T2, BLOCK_D], tl.float32)
    for start in range(0, walk_length(n0, n1, n2, P1, P2), BLOCK_Q):
        u0, u1, u2 = halo_steps(start, BLOCK_Q, FLAT0, FLAT1, P1, P2)
        q = halo_rows(q_row, u0, u1, u2, n0, n1, n2, D0, D1, D2, sq0, sq1, sq2, sqd, dim, d_valid, FLAT0, FLAT1)
        do = halo_rows(do_row, u0, u1, u2, n0, n1, n2, D0, D1, D2, sdo0, sdo1, sdo2, sdod, dim, d_valid,
                       FLAT0, FLAT1)
        l_off = l_row + halo_offsets(u0, u1, u2, n0, n1, n2, D0 * sl0, D1 * sl1, D2 * sl2, FLAT0, FLAT1)
        lse2, delta = tl.split(tl.load((stats_ptr + 2 * l_off)[:, None] + tl.arange(0, 2)[None, :]))

        # Each walked query's window in halo steps; a query past the sub-grid gets none (a query
        # past the halo box holds no key of the tile, so its window misses them by itself).
        lo0, hi0 = query_window(qs0 + u0, qs0, n_sub0, K0, C0)
        lo1, hi1 = query_window(qs1 + u1, qs1, n_sub1, K1, C1)
        lo2, hi2 = query_window(qs2 + u2, qs2, n_sub2, K2, C2)
        hi2 = tl.where((qs0 + u0 < n_sub0) & (qs1 + u1 < n_sub1) & (qs2 + u2 < n_sub2), hi2, -1)
        # Transposed problem: rows are this tile's keys, columns the halo block's queries.
        mask = (in_range(lo0[None, :], v0[:, None], hi0[None, :], FLAT0)
                & in_range(lo1[None, :], v1[:, None], hi1[None, :], FLAT1)
                & in_range(lo2[None, :], v2[:, None], hi2[None, :], False))
        if HAS_RPB:
            r = rpb_k[:, None] - rpb_steps(u0, u1, u2, K1, K2)[None, :]
            st = mma_add(k, tl.trans(q), rpb_load(rpb_row, r, R) * inv_scale, IEEE)
        else:
            st = mma(k, tl.trans(q), IEEE)
        pt = tl.where(mask, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
        dv += mma(pt.to(do.dtype), do, IEEE)
        dpt = mma(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += mma(dst.to(q.dtype), q, IEEE)

    g_off = b * sgb + h * sgh + (jp0 * D0 + g0) * sg0 + (jp1 * D1 + g1) * sg1 + (jp2 * D2 + g2) * sg2
    tl.store((dk_ptr + g_off)[:, None] + (dim * sgd)[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store((dv_ptr + g_off)[:, None] + (dim * sgd)[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


na_bwd_dq_kernel = config.autotuned(_na_bwd_dq_kernel, "BLOCK_K", "fused_bwd_dq",
                                    outputs=("dq_ptr", "stats_ptr", "drpb_ptr"))
na_bwd_dkdv_kernel = config.autotuned(_na_bwd_dkdv_kernel, "BLOCK_Q", "fused_bwd_dkdv", outputs=("dk_ptr", "dv_ptr"))
