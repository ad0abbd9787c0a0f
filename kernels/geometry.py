"""Window geometry of (dilated, causal) neighborhood attention, written once.

Everything that needs to know *which* keys a query attends to -- the reference op, the Triton
kernels (forward and the inverse-neighbourhood backward), the FLOP counter, the models' padding
rule -- reads it from here. The rules are NATTEN's (verified against NATTEN 0.21.7), per axis of
length ``L`` with kernel size ``k`` and dilation ``d``:

* Dilation splits the axis into ``d`` interleaved sub-grids. Query ``i`` belongs to group
  ``g = i % d`` and has sub-grid coordinate ``i' = i // d``; the group's sub-grid holds
  ``L_g = ceil((L - g) / d)`` tokens. Attention never crosses groups.
* Non-causal: ``start' = max(i' - wl, 0) + (i' + wr >= L_g) * (L_g - wr - i' - 1)`` with
  ``wl = k // 2`` and ``wr = k // 2 + k % 2 - 1``; the window ``[start', start' + k)`` is shifted
  inward at the borders, so every query has exactly ``k`` neighbours.
* Causal: ``start' = max(i' - k + 1, 0)``; slot ``t`` holds ``j' = start' + t`` and is valid iff
  ``j' <= i'`` (queries near the start have fewer than ``k`` neighbours).
* Sub-grid neighbour ``j'`` is token ``j = j' * d + g``; its relative-position-bias index is
  ``j' - i' + k - 1`` in ``[0, 2k - 2]``.

The multi-axis window is the Cartesian product of the per-axis windows, flattened row-major
(axis 0 slowest), which is the order of the last dimension of the QK logits.

Along one axis, the queries whose windows contain a key ``j`` form a contiguous run of the key's
sub-grid (``start'`` is non-decreasing in ``i'`` with steps of 0 or 1); ``AxisTables`` stores that
run as ``inverse_start``/``inverse_count`` so backward kernels can gather over it without atomics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "NAParams",
    "AxisTables",
    "axis_window",
    "axis_tables",
    "max_inverse_count",
    "neighborhood",
    "rpb_shape",
    "TileTables",
    "tile_tables",
]


@dataclass(frozen=True)
class NAParams:
    """Per-axis neighborhood-attention parameters, already validated and normalized to tuples."""

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @property
    def num_neighbors(self) -> int:
        """Slots per query, ``prod(kernel_size)`` (causal queries may use fewer of them)."""
        return math.prod(self.kernel_size)

    @property
    def any_causal(self) -> bool:
        return any(self.is_causal)


def rpb_shape(num_heads: int, kernel_size: Sequence[int]) -> tuple[int, ...]:
    """Shape of the relative position bias: ``[heads, 2*k1-1, ...]``."""
    return (num_heads, *(2 * k - 1 for k in kernel_size))


def _window_start_subgrid(ip: torch.Tensor, length_g: torch.Tensor, k: int, causal: bool) -> torch.Tensor:
    """First neighbour of sub-grid query ``ip`` inside a sub-grid of ``length_g`` tokens."""
    if causal:
        return torch.clamp(ip - k + 1, min=0)
    wl = k // 2
    wr = k // 2 + k % 2 - 1
    return torch.clamp(ip - wl, min=0) + (ip + wr >= length_g).long() * (length_g - wr - ip - 1)


@functools.lru_cache(maxsize=256)
def _axis_window_cpu(length: int, k: int, d: int, causal: bool):
    # Explicit CPU tensors: the result is cached, so a first call under `with torch.device("meta")`
    # must not fill the cache with meta tensors.
    i = torch.arange(length, device="cpu")
    g = i % d
    ip = i // d
    length_g = (length - g + d - 1) // d
    start = _window_start_subgrid(ip, length_g, k, causal)
    jp = start[:, None] + torch.arange(k, device="cpu")[None, :]  # [L, k] sub-grid coordinates
    valid = jp <= ip[:, None] if causal else torch.ones(length, k, dtype=torch.bool, device="cpu")
    neighbors = jp * d + g[:, None]
    rpb_bin = jp - ip[:, None] + k - 1
    return neighbors, valid, rpb_bin, start * d + g


def axis_window(length: int, kernel_size: int, dilation: int, is_causal: bool, device=None):
    """Neighbours of every query along one axis.

    Returns ``(neighbors, valid, rpb_bin)``, each ``[length, kernel_size]``: the token index of
    slot ``t`` of query ``i`` (always inside ``[0, length)``, also for invalid causal slots), whether
    that slot takes part, and its relative-position-bias index.
    """
    neighbors, valid, rpb_bin, _ = _axis_window_cpu(length, kernel_size, dilation, bool(is_causal))
    return neighbors.to(device), valid.to(device), rpb_bin.to(device)


def max_inverse_count(kernel_size: int, is_causal: bool) -> int:
    """Most queries along one axis whose windows contain one key."""
    if is_causal:
        return kernel_size
    # Windows start at 0 for the k//2 + 1 first queries, at L_g - k for the last (k+1)//2 and once
    # each in between; a key sees at most k distinct starts, so short sub-grids reach
    # (k//2 + 1) + (k - 2) + ((k+1)//2) = 2k - 1.
    return 2 * kernel_size - 1


@dataclass(frozen=True)
class AxisTables:
    """Small int32 tables a kernel loads instead of re-deriving the window rule.

    ``window_start[i]``: token index of slot 0 of query ``i`` (slot ``t`` is ``start + t*d``).
    ``inverse_start[j]``/``inverse_count[j]``: the queries whose windows contain key ``j`` are
    ``inverse_start[j] + s*d`` for ``s < inverse_count[j]``.
    """

    window_start: torch.Tensor
    inverse_start: torch.Tensor
    inverse_count: torch.Tensor


@functools.lru_cache(maxsize=256)
def _axis_tables_cpu(length: int, k: int, d: int, causal: bool) -> AxisTables:
    neighbors, valid, _, window_start = _axis_window_cpu(length, k, d, causal)
    member = torch.zeros(length, length, dtype=torch.bool, device="cpu")  # member[j, i]: i attends to j
    queries = torch.arange(length, device="cpu")
    member[neighbors[valid], queries[:, None].expand(length, k)[valid]] = True
    count = member.sum(1)
    first = torch.where(count > 0, member.float().argmax(1), queries)
    return AxisTables(window_start.int(), first.int(), count.int())


def axis_tables(length: int, kernel_size: int, dilation: int, is_causal: bool, device=None) -> AxisTables:
    t = _axis_tables_cpu(length, kernel_size, dilation, bool(is_causal))
    if device is None or torch.device(device).type == "cpu":
        return t
    return AxisTables(*(x.to(device, non_blocking=True) for x in (t.window_start, t.inverse_start, t.inverse_count)))


def neighborhood(spatial: Sequence[int], params: NAParams, device=None):
    """Flattened neighbourhood of every query of an n-D map.

    Returns ``(index, valid, rpb_bin)``, each ``[N, K]`` with ``N = prod(spatial)`` and
    ``K = prod(kernel_size)``: flat token index of every slot (row-major over the map), whether it
    takes part (``None`` when every slot does), and the flat index into ``rpb.view(heads, -1)``.
    """
    n = len(spatial)
    index = valid = rpb_bin = None
    for axis, (length, k, d, causal) in enumerate(zip(spatial, params.kernel_size, params.dilation, params.is_causal)):
        nb, va, rp = axis_window(length, k, d, causal, device)
        # Broadcast axis `axis` to shape [1,..,L,..,1, 1,..,k,..,1] (queries first, then slots).
        shape = [1] * (2 * n)
        shape[axis] = length
        shape[n + axis] = k
        nb, va, rp = nb.view(shape), va.view(shape), rp.view(shape)
        if index is None:
            index, valid, rpb_bin = nb, va, rp
        else:
            index = index * length + nb
            valid = valid & va
            rpb_bin = rpb_bin * (2 * k - 1) + rp
    N, K = math.prod(spatial), params.num_neighbors
    full = tuple(spatial) + tuple(params.kernel_size)
    index = index.expand(full).reshape(N, K)
    rpb_bin = rpb_bin.expand(full).reshape(N, K)
    valid = valid.expand(full).reshape(N, K) if params.any_causal else None
    return index, valid, rpb_bin


# --- query tiles with a halo of keys (the "tiled" PyTorch backend) ------------------------------


@dataclass(frozen=True)
class TileTables:
    """An undilated n-D map cut into query tiles, each with the box of keys its windows reach.

    ``query_index[t * tile_size + p]``: flat token (row-major over the map) of position ``p`` of
    tile ``t``; ``halo_index[t * halo_size + h]``: flat token of halo position ``h`` of tile ``t``;
    ``bias_index[t, p, h]``: flat index into ``rpb.view(heads, -1)`` of the key at halo position
    ``h`` for query ``p`` of tile ``t``, or ``num_rpb`` (one past the last bias) where that key is
    outside the query's window (or an unused causal slot); ``output_index[n]``: the tiled row
    (``t * tile_size + p``) that holds token ``n``'s result. The last tile along an axis that the
    tile size does not divide starts earlier and overlaps its neighbour, so every tile is full.
    """

    query_index: torch.Tensor
    halo_index: torch.Tensor
    bias_index: torch.Tensor
    output_index: torch.Tensor
    num_rpb: int

    @property
    def num_tiles(self) -> int:
        return self.bias_index.shape[0]

    @property
    def tile_size(self) -> int:
        return self.bias_index.shape[1]

    @property
    def halo_size(self) -> int:
        return self.bias_index.shape[2]


def _axis_tiles(length: int, k: int, causal: bool, tile: int):
    """One axis of ``tile_tables``: per tile, its queries, its halo and each (query, halo key)'s bias index."""
    neighbors, valid, rpb_bin, window_start = _axis_window_cpu(length, k, 1, causal)
    tile = min(tile, length)
    num_tiles = -(-length // tile)
    tile_start = torch.clamp(torch.arange(num_tiles) * tile, max=length - tile)
    queries = tile_start[:, None] + torch.arange(tile)  # [T, tile]
    halo = min(tile + k - 1, length)
    # Window starts rise by 0 or 1 per query, so a tile's windows lie in
    # [start(first), start(first) + tile - 1 + k): a box of `halo` keys, moved inward at the end.
    halo_start = torch.clamp(window_start[tile_start], max=length - halo)
    keys = halo_start[:, None] + torch.arange(halo)  # [T, halo]
    # bias[t, p, h]: rpb index of key keys[t, h] in the window of query queries[t, p], else -1.
    nb = neighbors[queries]  # [T, tile, k]
    hit = (nb[:, :, :, None] == keys[:, None, None, :]) & valid[queries][:, :, :, None]  # [T, tile, k, halo]
    rel = torch.where(hit, rpb_bin[queries][:, :, :, None], -1).amax(2)  # a key fills at most one slot
    position = torch.arange(length)
    tile_of = torch.clamp(position // tile, max=num_tiles - 1)
    output = tile_of * tile + position - tile_start[tile_of]
    return queries, keys, rel, output, num_tiles, tile


@functools.lru_cache(maxsize=128)
def _tile_tables_cpu(spatial: tuple, kernel_size: tuple, is_causal: tuple, tile: tuple) -> TileTables:
    ndim = len(spatial)
    per_axis = [_axis_tiles(*args) for args in zip(spatial, kernel_size, is_causal, tile)]
    num_tiles = [a[4] for a in per_axis]
    tiles = [a[5] for a in per_axis]
    halos = [a[1].shape[1] for a in per_axis]

    def combine(parts):
        """Flat tokens (row-major over the map) from per-axis ``[T_a, X_a]`` coordinates, laid out
        ``[T_0, .., T_{n-1}, X_0, .., X_{n-1}]`` (tile first, then position in the tile)."""
        flat = None
        for axis, (part, size) in enumerate(zip(parts, spatial)):
            shape = [1] * (2 * ndim)
            shape[axis], shape[ndim + axis] = part.shape
            part = part.view(shape)
            flat = part if flat is None else flat * size + part
        return flat.reshape(-1)

    query_index = combine([a[0] for a in per_axis])
    halo_index = combine([a[1] for a in per_axis])
    # bias: [T_0.., tile_0.., halo_0..], -1 anywhere on one axis -> outside the window.
    rel, outside = None, None
    for axis, (a, k) in enumerate(zip(per_axis, kernel_size)):
        shape = [1] * (3 * ndim)
        shape[axis], shape[ndim + axis], shape[2 * ndim + axis] = a[2].shape
        r = a[2].view(shape)
        rel = r.clamp(min=0) if rel is None else rel * (2 * k - 1) + r.clamp(min=0)
        outside = (r < 0) if outside is None else outside | (r < 0)
    num_rpb = math.prod(2 * k - 1 for k in kernel_size)
    bias_index = torch.where(outside, num_rpb, rel).expand(*num_tiles, *tiles, *halos)
    bias_index = bias_index.reshape(math.prod(num_tiles), math.prod(tiles), math.prod(halos))
    # Output: token (i_0, ..) sits at tile (t_0, ..), position (p_0, ..).
    output = None
    for axis, a in enumerate(per_axis):
        shape = [1] * ndim
        shape[axis] = spatial[axis]
        t, p = (a[3] // tiles[axis]).view(shape), (a[3] % tiles[axis]).view(shape)
        output = (t, p) if output is None else (output[0] * num_tiles[axis] + t, output[1] * tiles[axis] + p)
    output_index = (output[0] * math.prod(tiles) + output[1]).expand(*spatial).reshape(-1)
    return TileTables(query_index, halo_index, bias_index.contiguous(), output_index, num_rpb)


def tile_tables(spatial: Sequence[int], kernel_size: Sequence[int], is_causal: Sequence[bool],
                tile: Sequence[int], device=None) -> TileTables:
    """``TileTables`` of an undilated map (a dilated axis is ``dilation`` undilated sub-grids),
    built from the window rule above once per shape and cached; ``tile`` is the query tile's
    extent per axis (clipped to the map)."""
    key = (tuple(int(s) for s in spatial), tuple(int(k) for k in kernel_size), tuple(bool(c) for c in is_causal),
           tuple(int(t) for t in tile))
    tables = _tile_tables_cpu(*key)
    if device is None or torch.device(device).type == "cpu":
        return tables
    return _tile_tables_on(key, torch.device(device))


@functools.lru_cache(maxsize=128)
def _tile_tables_on(key, device: torch.device) -> TileTables:
    t = _tile_tables_cpu(*key)
    return TileTables(*(x.to(device) for x in (t.query_index, t.halo_index, t.bias_index, t.output_index)),
                      t.num_rpb)
