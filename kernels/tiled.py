"""Neighborhood attention in plain PyTorch, tiled: the fast path wherever Triton does not run.

Runs on any torch device (CPU, MPS, CUDA, ...), differentiable by autograd, ``torch.compile``-able.
Per call:

* Dilation ``d`` splits an axis into ``d`` interleaved sub-grids, each an ordinary undilated NA
  (``kernels.geometry``). The sub-grids are strided views, folded into the batch: when ``d``
  divides the axis they all have one length; otherwise the first ``L % d`` are one token longer,
  so there are at most two sub-grid lengths per axis, each batched on its own.
* Each sub-grid's queries are cut into tiles; a tile's windows all lie in one box of keys (its
  halo). Queries, keys and values of every tile are gathered once, as one ``index_select`` of
  contiguous ``head_dim`` rows of the heads-last input (no transposed copy first), straight into
  the ``[batch, heads, tiles, rows, head_dim]`` layout of the attention. Keys of the halo outside a
  query's window get ``-inf`` through an additive bias, which also carries the relative position
  bias: ``rpb`` gathered to ``[heads, tiles, tile, halo]`` through a per-shape index table cached in
  ``geometry.tile_tables`` (the window rule stays written once).
* The attention of each tile to its halo is PyTorch's ``scaled_dot_product_attention`` with that
  bias as the mask (fused kernels: the ``[tile, halo]`` logits are never materialised), unless an
  lse or the rpb's gradient is asked for, which that op does not give: then logits, softmax and
  the weighted sum are batched matmuls, differentiated by autograd.
* The work is chunked over batch x sub-grids so the largest temporary stays bounded.

Computation happens in float32 (float64 for float64 inputs), like ``kernels.reference``; outputs
come back in the input dtype, the log-sum-exp in float32. Only ``na`` is provided: the separate
``qk``/``av`` ops (logits materialised) stay with the reference under ``backend="auto"``.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from .geometry import NAParams, tile_tables

__all__ = ["na", "unavailable_reason", "tile_shape"]

# Elements of one chunk's largest temporary (float32: 4 bytes each): the [tile, halo] logits, or on
# the fused path the gathered halo keys. Bounds memory and keeps the working set near the caches;
# measured on a 2-core CPU (logits), 2**21..2**23 are equally fast.
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
def _cached_tables(spatial: tuple, kernel_size: tuple, is_causal: tuple, heads: int, device: torch.device) -> tuple:
    # Opaque to torch.compile: called while tracing, its tensors enter the graph as constants
    # (tracing the table construction itself would be slow and is not needed).
    return _row_tables(spatial, kernel_size, is_causal, heads, device)


@functools.lru_cache(maxsize=128)
def _row_tables(spatial: tuple, kernel_size: tuple, is_causal: tuple, heads: int, device: torch.device) -> tuple:
    """``geometry.tile_tables`` as rows of the ``[batch, tokens * heads, head_dim]`` view of a
    heads-last tensor, so that each gather is one ``index_select`` of contiguous rows straight into
    (or out of) the ``[batch, heads, tiles, rows, head_dim]`` layout the batched matmuls take:
    ``query_rows``/``halo_rows`` ``[heads * tiles * rows]``, ``output_rows`` ``[tokens * heads]``
    (the tiled row of each token and head) and ``bias_rows`` ``[heads, tiles, tile, halo]`` (into
    the flattened ``[heads, num_rpb + 1]`` bias table whose last column is ``-inf``)."""
    t = tile_tables(spatial, kernel_size, is_causal, tile_shape(spatial, kernel_size), device)
    head = torch.arange(heads, device=device)
    query_rows = (t.query_index[None, :] * heads + head[:, None]).reshape(-1)
    halo_rows = (t.halo_index[None, :] * heads + head[:, None]).reshape(-1)
    output_rows = (head[None, :] * t.query_index.numel() + t.output_index[:, None]).reshape(-1)
    bias_rows = head.view(-1, 1, 1, 1) * (t.num_rpb + 1) + t.bias_index
    return query_rows, halo_rows, output_rows, bias_rows, t.num_rpb


def _attend(q, k, v, spatial, params: NAParams, rpb, scale: float, return_lse: bool):
    """Undilated NA on heads-last ``[batch, N, heads, D]`` -> output ``[batch, N, heads, D]``, and
    lse ``[batch, N, heads]`` or None."""
    batch, tokens, heads, head_dim = q.shape
    spatial = tuple(int(s) for s in spatial)
    query_rows, halo_rows, output_rows, bias_rows, num_rpb = _cached_tables(
        spatial, params.kernel_size, params.is_causal, heads, q.device)
    _, tiles, tile, halo = bias_rows.shape
    if rpb is not None:
        table = rpb.reshape(heads, -1).to(q.dtype)
        table = torch.cat([table, table.new_full((heads, 1), float("-inf"))], 1)
        bias = table.view(-1).index_select(0, bias_rows.view(-1)).view(heads * tiles, tile, halo)
    else:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        bias = torch.where(bias_rows[0] == num_rpb, float("-inf"), zero)  # [tiles, tile, halo]
    # Fused: each tile is one "head" of scaled_dot_product_attention with the bias as its additive
    # mask (PyTorch's flash kernels never materialise the [tile, halo] logits). Those kernels do not
    # return a differentiable lse nor a gradient for the mask, so an lse, or an rpb that needs its
    # gradient, takes the explicit matmul/softmax path, differentiated by autograd.
    fused = not return_lse and not (bias.requires_grad and torch.is_grad_enabled())
    q, k, v = (x.reshape(batch, tokens * heads, head_dim) for x in (q, k, v))
    # One tile holding the whole map (a small sub-grid, e.g. 7x7 under dilation 8 at 56x56): its
    # queries and halo are the map itself, in order, so a transpose replaces the row gathers (and
    # their scatter-add backward).
    whole_map = tiles == 1 and tile == halo == tokens

    def gather(x, rows, size):
        if whole_map:
            return x.view(x.shape[0], tokens, heads, head_dim).transpose(1, 2).unsqueeze(2)
        return x.index_select(1, rows).view(x.shape[0], heads, tiles, size, head_dim)

    def untile(x):
        if whole_map:
            return x.reshape(-1, heads, tokens, x.shape[-1]).transpose(1, 2).reshape(-1, tokens * heads, x.shape[-1])
        return x.reshape(-1, heads * tiles * tile, x.shape[-1]).index_select(1, output_rows)

    # Bound the chunk's largest temporary: the logits, or (fused) the gathered halo keys.
    per_batch = heads * tiles * halo * (head_dim if fused else tile)
    chunk = max(1, CHUNK_ELEMENTS // per_batch)
    outs, lses = [], []
    for start in range(0, batch, chunk):
        qc, kc, vc = (x[start:start + chunk] for x in (q, k, v))
        q_tiles = gather(qc, query_rows, tile)
        k_halo, v_halo = gather(kc, halo_rows, halo), gather(vc, halo_rows, halo)
        if fused:
            # [chunk, heads, tiles, rows, D] as [chunk * heads * tiles / groups, groups, rows, D],
            # groups matching the mask's first dimension (heads * tiles with rpb, tiles without).
            groups = bias.shape[0]
            q_tiles, k_halo, v_halo = (x.reshape(-1, groups, *x.shape[-2:]) for x in (q_tiles, k_halo, v_halo))
            out = F.scaled_dot_product_attention(q_tiles, k_halo, v_halo, scale=scale,
                                                 attn_mask=bias.expand(q_tiles.shape[0], -1, -1, -1))
            outs.append(untile(out).view(-1, tokens, heads, head_dim))
            continue
        logits = torch.matmul(q_tiles * scale, k_halo.transpose(-1, -2)) + bias.view(-1, tiles, tile, halo)
        if return_lse:
            lse = torch.logsumexp(logits, -1, keepdim=True)
            weights = torch.exp(logits - lse)
            lses.append(untile(lse).view(-1, tokens, heads))
        else:
            weights = torch.softmax(logits, -1)
        outs.append(untile(torch.matmul(weights, v_halo)).view(-1, tokens, heads, head_dim))
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

    # [B, *L, H, D] -> [B, *d, *S, H, D]: sub-grid g of an axis holds tokens g, g + d, g + 2d, ...
    # (heads stay next to the head dim: for d = 1 this is a view of the input, no copy).
    split = [batch]
    for length, d in zip(lengths, dilation):
        split += [length, d]
    order = [0, *(2 + 2 * a for a in range(ndim)), *(1 + 2 * a for a in range(ndim)), 2 * ndim + 1, 2 * ndim + 2]
    padding = []
    for size, length, d in zip(reversed(spatial), reversed(lengths), reversed(dilation)):
        padding += [0, length * d - size]

    def to_sub_grids(x):
        x = x.to(dtype)
        if any(padding):
            x = F.pad(x, [0, 0, 0, 0, *padding])
        return x.view(*split, heads, head_dim).permute(order)

    q, k, v = to_sub_grids(query), to_sub_grids(key), to_sub_grids(value)
    single = all(len(c) == 1 for c in classes)
    out = lse = None
    if not single:
        out = q.new_zeros(q.shape)
        lse = q.new_zeros(q.shape[:-1]) if return_lse else None
    for combo in itertools.product(*classes):
        groups = [g for g, _ in combo]
        sub_spatial = [n for _, n in combo]
        where = (slice(None), *groups, *(slice(0, n) for n in sub_spatial))
        gathered = [x[where].reshape(-1, math.prod(sub_spatial), heads, head_dim) for x in (q, k, v)]
        o, l = _attend(*gathered, sub_spatial, undilated, rpb, scale, return_lse)
        shape = [batch, *(g.stop - g.start for g in groups), *sub_spatial, heads]
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
