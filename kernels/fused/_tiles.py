"""Tile and halo arithmetic shared by the fused forward and backward kernels.

Every problem is handled as 3-D: a 1-D/2-D map gets leading axes of size 1 with kernel size 1,
dilation 1 and stride 0, on which the window rule degenerates to "the single token".

A program owns one tile of ``T0 x T1 x T2`` tokens of one dilation group's sub-grid (a dilation
group is a plain NA problem on the sub-grid: token = sub-grid coordinate * d + group). Along each
axis the window start is non-decreasing in the query, so the union of the tile's windows (the
*halo*) is a box from the first query's window start to the last query's window end. The box is
walked in flat blocks on a compile-time pitch; per query, keys outside its own window are masked.

All index arithmetic is in sub-grid coordinates and halo steps: the dilation and the group only
enter the memory offsets (one stride per halo step), so nothing in a loop divides by a runtime
value, and a window test is a compare pair per axis.
"""

import triton
import triton.language as tl

from ..triton_geometry import (subgrid_inverse_first, subgrid_inverse_last, subgrid_length,
                               subgrid_window_start)


@triton.jit
def split_program(pid, L0, L1, L2, D0, D1, D2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Program id -> (dilation group per axis, tile start per axis in sub-grid coordinates).

    Tiles are counted on the largest sub-grid (group 0); smaller groups get trailing empty tiles.
    Everything here is non-negative: unsigned, a division by a runtime value costs about half the
    instructions of a signed one.
    """
    nt0 = tl.cdiv(group_length(0, L0, D0), T0)
    nt1 = tl.cdiv(group_length(0, L1, D1), T1)
    nt2 = tl.cdiv(group_length(0, L2, D2), T2)
    tiles = nt0 * nt1 * nt2
    upid = tl.cast(pid, tl.uint32)
    tile = upid % tiles
    group = upid // tiles
    d2 = tl.cast(D2, tl.uint32)
    d1 = tl.cast(D1, tl.uint32)
    g2 = group % d2
    g1 = (group // d2) % d1
    g0 = group // (d1 * d2)
    a2 = (tile % nt2) * T2
    a1 = ((tile // nt2) % nt1) * T1
    a0 = (tile // (nt1 * nt2)) * T0
    return (signed(g0), signed(g1), signed(g2), signed(a0), signed(a1), signed(a2))


@triton.jit
def group_length(g, length, dilation):
    """Tokens of dilation group ``g`` (``0 <= g < dilation``) along an axis of ``length`` tokens, unsigned
    (``triton_geometry.subgrid_length`` for any token, without its modulo)."""
    d = tl.cast(dilation, tl.uint32)
    return (tl.cast(length, tl.uint32) + d - 1 - tl.cast(g, tl.uint32)) // d


@triton.jit
def batch_head(bh, H):
    """Program id along the ``batch * heads`` grid axis -> (batch as int64, head)."""
    ubh = tl.cast(bh, tl.uint32)
    uh = tl.cast(H, tl.uint32)
    return (ubh // uh).to(tl.int64), signed(ubh % uh)


@triton.jit
def signed(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def tile_steps(T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """The tile's ``T0 * T1 * T2`` queries (or keys), flat (row-major, axis 0 slowest): the step of
    each along every axis (constexpr powers of two: shifts and masks)."""
    idx = tl.arange(0, T0 * T1 * T2)
    return idx // (T1 * T2), (idx // T2) % T1, idx % T2


@triton.jit
def query_tile_axis(a, t, length_g, K: tl.constexpr, C: tl.constexpr, T: tl.constexpr):
    """One axis of a query tile starting at sub-grid coordinate ``a`` (tile steps ``t``).

    Returns each query's sub-grid coordinate, the first key (sub-grid coordinate) and extent of the
    union of the tile's windows along this axis (the halo: window starts are non-decreasing in the
    query, in steps of 0 or 1, so the union is ``< T + K`` keys), and each query's window as the
    closed range ``[lo, hi]`` of halo steps.
    """
    ip = a + t
    first = subgrid_window_start(a, length_g, K, C)
    last = subgrid_window_start(tl.minimum(a + T, length_g) - 1, length_g, K, C) + K - 1
    lo, hi = query_window(ip, first, length_g, K, C)
    return ip, first, last - first + 1, lo, hi


@triton.jit
def query_window(ip, first, length_g, K: tl.constexpr, C: tl.constexpr):
    """The window of sub-grid queries ``ip`` along one axis, as the closed range ``[lo, hi]`` of
    steps from sub-grid coordinate ``first``."""
    lo = subgrid_window_start(ip, length_g, K, C) - first
    hi = lo + K - 1
    if C:
        hi = tl.minimum(hi, ip - first)
    return lo, hi


@triton.jit
def key_tile_axis(a, t, length_g, K: tl.constexpr, C: tl.constexpr, T: tl.constexpr):
    """One axis of a key tile starting at sub-grid coordinate ``a`` (tile steps ``t``).

    Returns each key's sub-grid coordinate, the first query and extent of the union of the keys'
    inverse neighbourhoods (a contiguous run per key, and the runs' ends are non-decreasing), and
    each key's step from that first query.
    """
    jp = a + t
    first = subgrid_inverse_first(a, K, C)
    last = subgrid_inverse_last(tl.minimum(a + T, length_g) - 1, length_g, K, C)
    return jp, first, last - first + 1, jp - first


@triton.jit
def halo_steps(start, BLOCK: tl.constexpr, FLAT0: tl.constexpr, FLAT1: tl.constexpr,
               P1: tl.constexpr, P2: tl.constexpr):
    """Halo steps per axis of entries ``start .. start + BLOCK - 1`` of the walk over a halo box.

    A *flat* axis (tile and window of one token: a 1-D/2-D problem's padding axes) has step 0
    throughout and is dropped at trace time. The other axes are laid out on a compile-time pitch:
    ``P2`` entries per axis-2 row, ``P1`` rows per axis-1 slab (powers of two, at least the halo's
    extent; the leading walked axis is unbounded), so the split is shifts and masks. ``start`` is a
    multiple of ``BLOCK``, and both are powers of two: either a block holds whole rows (each
    entry's column is loop invariant) or a row holds whole blocks (one row per block).
    """
    idx = tl.arange(0, BLOCK)
    zero = tl.zeros_like(idx)
    if FLAT0 and FLAT1:  # 1-D: the walk is axis 2 itself
        u0, u1, u2 = zero, zero, start + idx
    else:
        if BLOCK % P2 == 0:
            u2 = idx % P2
            row = start // P2 + idx // P2
        else:
            u2 = start % P2 + idx
            row = start // P2 + zero
        if FLAT0:
            u0, u1 = zero, row
        else:
            u0, u1 = row // P1, row % P1
    return u0, u1, u2


@triton.jit
def walk_entry(u0, u1, u2, FLAT0: tl.constexpr, FLAT1: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr):
    """Position in the walk of ``halo_steps`` of per-axis halo steps ``u`` (its inverse)."""
    if FLAT0 and FLAT1:
        f = u2
    else:
        f = (u0 * P1 + u1) * P2 + u2
    return f


@triton.jit
def walk_length(n0, n1, n2, P1: tl.constexpr, P2: tl.constexpr):
    """Entries of the pitched walk up to the halo's last entry (the box ``n0 x n1 x n2``)."""
    return walk_entry(n0 - 1, n1 - 1, n2 - 1, False, False, P1, P2) + 1


@triton.jit
def halo_offsets(u0, u1, u2, n0, n1, n2, s0, s1, s2, FLAT0: tl.constexpr, FLAT1: tl.constexpr):
    """Memory offset of each walked entry from the halo's first token (``s``: stride per halo
    step). Steps past the halo are clamped to its last row/column, so loads need no mask."""
    off = tl.minimum(u2, n2 - 1) * s2
    if not FLAT1:
        off += tl.minimum(u1, n1 - 1) * s1
    if not FLAT0:
        off += tl.minimum(u0, n0 - 1) * s0
    return off


@triton.jit
def halo_rows(row_ptr, u0, u1, u2, n0, n1, n2, D0, D1, D2, s0, s1, s2, sd, dim, d_valid,
              FLAT0: tl.constexpr, FLAT1: tl.constexpr):
    """The ``[BLOCK, BLOCK_D]`` rows of walked entries ``u`` of a tensor with strides ``s`` (per
    token) and ``sd`` (per element), from ``row_ptr`` (the halo's first token)."""
    off = halo_offsets(u0, u1, u2, n0, n1, n2, D0 * s0, D1 * s1, D2 * s2, FLAT0, FLAT1)
    return tl.load(row_ptr + off[:, None] + (dim * sd)[None, :], mask=d_valid[None, :], other=0.0)


@triton.jit
def window_logits(q, k, u0, u1, u2, lo0, lo1, lo2, hi0, hi1, hi2, rpb_row, rpb_q, inv_scale,
                  K1: tl.constexpr, K2: tl.constexpr, R: tl.constexpr, FLAT0: tl.constexpr, FLAT1: tl.constexpr,
                  HAS_RPB: tl.constexpr, IEEE: tl.constexpr):
    """Query-centric block: ``q.k + rpb / scale`` of a query tile against walked keys ``u``, and
    whether each key is in each query's window ``[lo, hi]`` (a compare pair per axis)."""
    mask = (in_range(lo0[:, None], u0[None, :], hi0[:, None], FLAT0)
            & in_range(lo1[:, None], u1[None, :], hi1[:, None], FLAT1)
            & in_range(lo2[:, None], u2[None, :], hi2[:, None], False))
    if HAS_RPB:
        r = rpb_q[:, None] + rpb_steps(u0, u1, u2, K1, K2)[None, :]
        s = mma_add(q, tl.trans(k), rpb_load(rpb_row, r, R) * inv_scale, IEEE)
    else:
        s = mma(q, tl.trans(k), IEEE)
    return s, mask


@triton.jit
def in_range(lo, u, hi, FLAT: tl.constexpr):
    """``lo <= u <= hi`` for a [rows, 1] range and [1, cols] steps; always true on a flat axis."""
    if FLAT:
        ok = (lo <= hi) | (u == u)
    else:
        ok = (lo <= u) & (u <= hi)
    return ok


@triton.jit
def rpb_steps(u0, u1, u2, K1: tl.constexpr, K2: tl.constexpr):
    """Flat offset in an RPB table ``[2K0-1, 2K1-1, 2K2-1]`` of per-axis steps ``u``."""
    return (u0 * (2 * K1 - 1) + u1) * (2 * K2 - 1) + u2


@triton.jit
def rpb_load(row_ptr, index, R: tl.constexpr):
    """``row_ptr[index]`` with the index clamped into the table: entries outside a query's window
    read some in-range entry (masked later) instead of taking a masked gather."""
    # As unsigned, a negative index is huge: one minimum clamps both ends.
    return tl.load(row_ptr + tl.minimum(index.to(tl.uint32, bitcast=True), R - 1)).to(tl.float32)


@triton.jit
def mma_add(a, b, c, IEEE: tl.constexpr):
    """``a @ b + c`` in fp32 (see ``mma``).

    Adding a gathered term (the RPB) as the product's accumulator keeps it out of the softmax's
    layout: the compiler converts the gathered block to the product's layout once, instead of
    moving the logits into the gather's layout for the row reductions and back.
    """
    if IEEE:
        return tl.dot(a, b, c, input_precision="ieee")
    else:
        return tl.dot(a, b, c)


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32; exact fp32 products for fp32 inputs (tl.dot would use tf32 on a GPU).

    A bool rather than a string constexpr: simpler for Inductor to pass through.
    """
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)

