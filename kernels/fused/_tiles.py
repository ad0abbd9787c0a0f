"""Tile and halo arithmetic shared by the fused forward and backward kernels.

Every problem is handled as 3-D: a 1-D/2-D map gets leading axes of size 1 with kernel size 1,
dilation 1 and stride 0, on which the window rule degenerates to "the single token".

A program owns one tile of ``T0 x T1 x T2`` tokens of one dilation group's sub-grid (a dilation
group is a plain NA problem on the sub-grid: token = sub-grid coordinate * d + group). Along each
axis the window start is non-decreasing in the query, so the union of the tile's windows (the
*halo*) is a box from the first query's window start to the last query's window end. The box is
walked in flat blocks; per query, keys outside its own window are masked.
"""

import triton
import triton.language as tl

from ..triton_geometry import inverse_count, inverse_first, rpb_offset, slot_valid, subgrid_length, window_start


@triton.jit
def split_program(pid, L0, L1, L2, D0, D1, D2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Program id -> (dilation group per axis, tile start per axis in sub-grid coordinates).

    Tiles are counted on the largest sub-grid (group 0); smaller groups get trailing empty tiles.
    """
    nt0 = tl.cdiv(tl.cdiv(L0, D0), T0)
    nt1 = tl.cdiv(tl.cdiv(L1, D1), T1)
    nt2 = tl.cdiv(tl.cdiv(L2, D2), T2)
    tiles = nt0 * nt1 * nt2
    tile = pid % tiles
    group = pid // tiles
    g2 = group % D2
    g1 = (group // D2) % D1
    g0 = group // (D1 * D2)
    a2 = (tile % nt2) * T2
    a1 = ((tile // nt2) % nt1) * T1
    a0 = (tile // (nt1 * nt2)) * T0
    return g0, g1, g2, a0, a1, a2


@triton.jit
def tile_tokens(a, g, length, d, T: tl.constexpr, idx):
    """Token index (full axis) of tile coordinate ``idx`` along one axis, and whether it exists."""
    sub = a + idx
    return sub * d + g, sub < subgrid_length(g, length, d)


@triton.jit
def tile_block(a0, a1, a2, g0, g1, g2, L0, L1, L2, D0, D1, D2,
               T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """The tile's ``T0 * T1 * T2`` tokens, flat (row-major, axis 0 slowest): token index per axis and
    whether each token exists."""
    idx = tl.arange(0, T0 * T1 * T2)
    i0, v0 = tile_tokens(a0, g0, L0, D0, T0, idx // (T1 * T2))
    i1, v1 = tile_tokens(a1, g1, L1, D1, T1, (idx // T2) % T1)
    i2, v2 = tile_tokens(a2, g2, L2, D2, T2, idx % T2)
    return i0, i1, i2, v0 & v1 & v2


@triton.jit
def tile_last(a, g, length, d, T: tl.constexpr):
    """Token index of the last existing tile coordinate along one axis (tile assumed non-empty)."""
    return (tl.minimum(a + T, subgrid_length(g, length, d)) - 1) * d + g


@triton.jit
def query_halo(a, g, length, d, K: tl.constexpr, C: tl.constexpr, T: tl.constexpr):
    """First key token and key count (sub-grid steps) of the union of a query tile's windows."""
    first = window_start(a * d + g, length, K, d, C)
    last = window_start(tile_last(a, g, length, d, T), length, K, d, C) + (K - 1) * d
    return first, (last - first) // d + 1


@triton.jit
def key_halo(a, g, length, d, K: tl.constexpr, C: tl.constexpr, T: tl.constexpr):
    """First query token and query count of the union of a key tile's inverse neighbourhoods."""
    first = inverse_first(a * d + g, length, K, d, C)
    j = tile_last(a, g, length, d, T)
    last = inverse_first(j, length, K, d, C) + (inverse_count(j, length, K, d, C) - 1) * d
    return first, (last - first) // d + 1


@triton.jit
def halo_coords(f, n1, n2):
    """Flat halo index -> per-axis step counts (row-major, axis 0 slowest)."""
    return f // (n1 * n2), (f // n2) % n1, f % n2


@triton.jit
def halo_block(start, BLOCK: tl.constexpr, halo, h0, h1, h2, n1, n2, D0, D1, D2):
    """Entries ``start .. start + BLOCK - 1`` of the flat walk over a halo box of ``halo`` tokens
    starting at token ``h``: whether each is in the box, its per-axis steps, its token per axis."""
    f = start + tl.arange(0, BLOCK)
    u0, u1, u2 = halo_coords(f, n1, n2)
    return f < halo, u0, u1, u2, h0 + u0 * D0, h1 + u1 * D1, h2 + u2 * D2


@triton.jit
def in_window(i, ws, j, d, K: tl.constexpr, C: tl.constexpr):
    """Whether key token ``j`` takes part in the window of query ``i`` (window start ``ws``)."""
    # slot_valid's two constexpr branches return shapes of (i, j) and of j; the GPU compiler
    # type-checks both returns, so hand it operands of one shape.
    i, j = tl.broadcast(i, j)
    return (j >= ws) & (j <= ws + (K - 1) * d) & slot_valid(i, j, C)


@triton.jit
def halo_flat(u0, u1, u2, n1, n2):
    """Per-axis step counts -> flat index in a box of ``n0 x n1 x n2`` (inverse of halo_coords)."""
    return (u0 * n1 + u1) * n2 + u2


@triton.jit
def rpb_index(i0, i1, i2, j0, j1, j2, d0, d1, d2, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Flat index into ``rpb[h]`` (shape ``[2K0-1, 2K1-1, 2K2-1]``) for query i and key j.

    Kernels call it once per tile against the halo start and add the halo step of each key
    (``rpb_offset(i, j) = rpb_offset(i, h) + (j - h) // d`` within a dilation group), which keeps
    the per-(query, key) integer work to one add.
    """
    r0 = rpb_offset(i0, j0, K0, d0)
    r1 = rpb_offset(i1, j1, K1, d1)
    r2 = rpb_offset(i2, j2, K2, d2)
    return (r0 * (2 * K1 - 1) + r1) * (2 * K2 - 1) + r2


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32; exact fp32 products for fp32 inputs (tl.dot would use tf32 on a GPU).

    A bool rather than a string constexpr: simpler for Inductor to pass through.
    """
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
