"""Neighborhood attention in plain PyTorch, tiled: the fast path wherever Triton does not run.

Runs on any torch device (CPU, MPS, CUDA, ...), differentiable by autograd, ``torch.compile``-able.
Per call:

* Dilation ``d`` splits an axis into ``d`` interleaved sub-grids, each an ordinary undilated NA
  (``kernels.geometry``). The sub-grids are strided views, folded into the batch: when ``d``
  divides the axis they all have one length; otherwise the first ``L % d`` are one token longer,
  so there are at most two sub-grid lengths per axis, each batched on its own.
* Each sub-grid's queries are cut into tiles; a tile's windows all lie in one box of keys (its
  halo). Keys and values of every halo are gathered once (``index_select``), then logits, softmax
  and the weighted sum are batched matmuls over ``[tile, halo]`` blocks. Keys of the halo outside a
  query's window get ``-inf`` through an additive bias, which also carries the relative position
  bias: ``rpb`` gathered to ``[heads, tiles, tile, halo]`` through a per-shape index table cached in
  ``geometry.tile_tables`` (the window rule stays written once).
* The work is chunked over batch x sub-grids so the ``[tile, halo]`` logits stay bounded.

Computation happens in float32 (float64 for float64 inputs), like ``kernels.reference``; outputs
come back in the input dtype, the log-sum-exp in float32. Only ``na`` is provided: the separate
``qk``/``av`` ops (logits materialised) stay with the reference under ``backend="auto"``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .geometry import NAParams, TileTables, tile_tables

__all__ = ["na", "unavailable_reason", "tile_shape"]

# Elements of one chunk's [tile, halo] logits (float32: 4 bytes each). Bounds memory and keeps the
# working set near the caches; measured on a 2-core CPU, 2**21..2**23 are equally fast.
CHUNK_ELEMENTS = 2**22


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain torch ops: runs anywhere


def tile_shape(spatial, kernel_size) -> tuple[int, ...]:
    """Query tile extent per axis for an undilated sub-grid.

    About 64 queries per tile in any rank (8x8 in 2-D, 4x4x4 in 3-D), more along a 1-D axis; the
    tile count along an axis is then spread evenly so that the last tile overlaps little.
    """
    target = {1: 64, 2: 8, 3: 4}[len(spatial)]
    shape = []
    for length, k in zip(spatial, kernel_size):
        count = -(-length // max(target, 1))
        shape.append(min(length, -(-length // count)))
    return tuple(shape)


@torch.compiler.assume_constant_result
def _cached_tables(spatial: tuple, kernel_size: tuple, is_causal: tuple, device: torch.device) -> tuple:
    # Opaque to torch.compile: called while tracing, its tensors enter the graph as constants
    # (tracing the table construction itself would be slow and is not needed).
    t = tile_tables(spatial, kernel_size, is_causal, tile_shape(spatial, kernel_size), device)
    return t.query_index, t.halo_index, t.bias_index, t.output_index, t.num_rpb


def _tables(spatial, params: NAParams, like: torch.Tensor) -> TileTables:
    """The tables of this sub-grid shape, cached per shape and device."""
    spatial = tuple(int(s) for s in spatial)
    return TileTables(*_cached_tables(spatial, params.kernel_size, params.is_causal, like.device))


def _attend(q, k, v, spatial, params: NAParams, rpb, return_lse: bool):
    """Undilated NA on ``[batch, heads, N, D]`` (queries pre-scaled) -> output, and lse or None."""
    tables = _tables(spatial, params, q)
    batch, heads, _, head_dim = q.shape
    tiles, tile, halo = tables.num_tiles, tables.tile_size, tables.halo_size
    if rpb is not None:
        table = rpb.reshape(heads, -1).to(q.dtype)
        table = torch.cat([table, table.new_full((heads, 1), float("-inf"))], 1)
        bias = table[:, tables.bias_index]  # [heads, tiles, tile, halo]
    else:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        bias = torch.where(tables.bias_index == tables.num_rpb, float("-inf"), zero)  # [tiles, tile, halo]
    # One tile holding the whole map (a small sub-grid, e.g. 7x7 under dilation 8 at 56x56): its
    # queries and halo are the map itself, in order, so nothing needs gathering.
    whole_map = tiles == 1 and tile == halo == q.shape[2]

    def gather(x, index, rows):
        x = x if whole_map else x.index_select(2, index)
        return x.view(x.shape[0], heads, tiles, rows, x.shape[-1])

    def untile(x):
        x = x.reshape(x.shape[0], heads, tiles * tile, x.shape[-1])
        return x if whole_map else x.index_select(2, tables.output_index)

    chunk = max(1, CHUNK_ELEMENTS // (heads * tiles * tile * halo))
    outs, lses = [], []
    for start in range(0, batch, chunk):
        qc, kc, vc = (x[start:start + chunk] for x in (q, k, v))
        q_tiles = gather(qc, tables.query_index, tile)
        k_halo, v_halo = gather(kc, tables.halo_index, halo), gather(vc, tables.halo_index, halo)
        logits = torch.matmul(q_tiles, k_halo.transpose(-1, -2)) + bias
        if return_lse:
            lse = torch.logsumexp(logits, -1, keepdim=True)
            weights = torch.exp(logits - lse)
            lses.append(untile(lse).squeeze(-1))
        else:
            weights = torch.softmax(logits, -1)
        outs.append(untile(torch.matmul(weights, v_halo)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    lse = None if not return_lse else (lses[0] if len(lses) == 1 else torch.cat(lses))
    return out, lse


def _sub_grids(spatial, dilation):
    """Per axis: the sub-grid length ``ceil(L / d)`` and the classes of sub-grids sharing one
    length, as ``(group slice, length)`` (one class when ``d`` divides ``L``, else two)."""
    lengths, classes = [], []
    for size, d in zip(spatial, dilation):
        full, extra = -(-size // d), size % d
        lengths.append(full)
        classes.append([(slice(0, d), full)] if extra == 0 else [(slice(0, extra), full), (slice(extra, d), full - 1)])
    return lengths, classes


def na(query, key, value, params: NAParams, rpb=None, scale: float = 1.0, return_lse: bool = False):
    dtype = torch.promote_types(query.dtype, torch.float32)
    batch, *spatial, heads, head_dim = query.shape
    ndim = len(spatial)
    dilation = params.dilation
    lengths, classes = _sub_grids(spatial, dilation)
    undilated = NAParams(params.kernel_size, (1,) * ndim, params.is_causal)

    # [B, *L, H, D] -> [B, *d, H, *S, D]: sub-grid g of an axis holds tokens g, g + d, g + 2d, ...
    split = [batch]
    for length, d in zip(lengths, dilation):
        split += [length, d]
    order = [0, *(2 + 2 * a for a in range(ndim)), 2 * ndim + 1, *(1 + 2 * a for a in range(ndim)), 2 * ndim + 2]
    padding = []
    for size, length, d in zip(reversed(spatial), reversed(lengths), reversed(dilation)):
        padding += [0, length * d - size]

    def to_sub_grids(x, factor=None):
        x = x.to(dtype)
        if factor is not None:
            x = x * factor
        if any(padding):
            x = F.pad(x, [0, 0, 0, 0, *padding])
        return x.view(*split, heads, head_dim).permute(order)

    q, k, v = to_sub_grids(query, scale), to_sub_grids(key), to_sub_grids(value)
    single = all(len(c) == 1 for c in classes)
    out = lse = None
    if not single:
        out = q.new_zeros(q.shape)
        lse = q.new_zeros(q.shape[:-1]) if return_lse else None
    for combo in itertools.product(*classes):
        groups = [g for g, _ in combo]
        sub_spatial = [n for _, n in combo]
        where = (slice(None), *groups, slice(None), *(slice(0, n) for n in sub_spatial))
        gathered = [x[where].reshape(-1, heads, math.prod(sub_spatial), head_dim) for x in (q, k, v)]
        o, l = _attend(*gathered, sub_spatial, undilated, rpb, return_lse)
        shape = [batch, *(g.stop - g.start for g in groups), heads, *sub_spatial]
        if single:
            out, lse = o.view(*shape, head_dim), None if l is None else l.view(shape)
        else:
            out[where] = o.view(*shape, head_dim)
            if return_lse:
                lse[where] = l.view(shape)

    # Back to [B, *L, H, D]: inverse permutation, merge (S, d) per axis, drop the padding.
    inverse = [order.index(i) for i in range(len(order))]
    out = out.permute(inverse).reshape(batch, *(n * d for n, d in zip(lengths, dilation)), heads, head_dim)
    crop = (slice(None), *(slice(0, s) for s in spatial))
    out = out[crop].to(value.dtype)
    if not return_lse:
        return out
    lse = lse.permute(inverse[:-1]).reshape(batch, *(n * d for n, d in zip(lengths, dilation)), heads)
    return out, lse[crop].float()
