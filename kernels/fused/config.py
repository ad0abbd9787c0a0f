"""Launch configuration: tile shapes (a heuristic on the map) and autotuned halo blocks."""

from __future__ import annotations

import math
from typing import Optional

import triton

from .. import tuning
from ..triton_utils import interpreted

# What the autotuner's cache is keyed on: what changes the best block (head size, window, tile).
# Map sizes and dilations are left out on purpose: they change the amount of work, not its shape,
# and keying on them would re-benchmark every layer of a DiNAT (dilations 1..8) separately.
AUTOTUNE_KEY = ["head_dim", "K0", "K1", "K2", "C0", "C1", "C2", "T0", "T1", "T2", "HAS_RPB", "BLOCK_D"]

# Queries per tile; the tile is shaped so one tile's windows overlap as much as possible.
TILE_TOKENS = 64
# tl.dot needs every dimension >= 16 on a GPU.
MIN_DOT = 16


# Autotune candidates of the fused kernels: (halo block, warps, pipeline stages). 128-entry blocks
# take 8 warps: with 4, the dQ kernel spills on Triton 3.6 even at head_dim 32. The forward has no
# 64-key, 4-warp, 2-stage candidate: on Triton 3.6 it needs 138 registers at the undilated
# DiNAT-tiny layers (3 programs per SM) where the 3-stage one compiles to 128 (4 per SM) with the
# same loop (617 against 615 SASS per iteration) -- and a 128-register ceiling (``maxnreg``) on the
# 2-stage one spills on Triton 3.8 (docs/kernel_audit.md, "Forward registers").
CANDIDATES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "fused_fwd": ((32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    "fused_bwd_dq": ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    "fused_bwd_dkdv": ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
}


def _configs(block_name: str, tuning_name: str) -> list[triton.Config]:
    if interpreted():
        # The interpreter runs every config it is given: exactly one.
        return [triton.Config({block_name: 128}, num_warps=4, num_stages=1)]
    return [triton.Config({block_name: block}, num_warps=warps, num_stages=stages)
            for block, warps, stages in CANDIDATES[tuning_name]]


def candidate_of(config: triton.Config, block_name: str) -> tuple[int, int, int]:
    return config.kwargs.get(block_name), config.num_warps, config.num_stages


def spill_free(tuning_name: str, block_d: int, ieee: bool) -> Optional[tuple[tuple[int, int, int], ...]]:
    """The measured survivors of ``tuning_name`` at head-dim class ``block_d`` (16-bit inputs, or
    fp32 when ``ieee``), or None where nothing was measured (then every candidate stays)."""
    return SPILL_FREE.get((tuning_name, "fp32" if ieee else "16-bit", block_d))


# Which candidates compile without spills (ptxas -v: 0 spill-store bytes) on BOTH Triton 3.6.0 (the
# GPU image) and 3.8.0 (installed), sm_90, per (kernel, input class, BLOCK_D). Measured with
#   python -m benchmarks.kernel_audit --triton both --backends fused --all-configs
#       --shape spatial=56x56,heads=2,head_dim=<D>,kernel=7,dilation=1
# (DiNAT-tiny stage 1, bf16, RPB, q/k/v views of one qkv projection) on 2026-12-02, D = 32, 64,
# 128, 256; docs/kernel_audit.md, "Autotune candidates per head dim". A class without any
# spill-free candidate keeps the one that spilled least. fp32 inputs, and head dims <= 16, were not
# measured: every candidate stays there.
SPILL_FREE: dict[tuple[str, str, int], tuple[tuple[int, int, int], ...]] = {
    ("fused_fwd", "16-bit", 32): ((32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    ("fused_fwd", "16-bit", 64): ((32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    ("fused_fwd", "16-bit", 128): ((32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    ("fused_fwd", "16-bit", 256): ((64, 8, 3),),
    # dQ re-measured after its dRPB moved to window classes (2026-12-02, d=1 and d=8): 128-key
    # blocks are spill-free now up to D=64 and 32-key ones at D=128 (docs/kernel_audit.md, "dRPB by
    # window class").
    ("fused_bwd_dq", "16-bit", 32): ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    ("fused_bwd_dq", "16-bit", 64): ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)),
    ("fused_bwd_dq", "16-bit", 128): ((32, 4, 2), (64, 8, 3)),
    ("fused_bwd_dq", "16-bit", 256): ((64, 8, 3),),  # spill-free at d=1; at d=8 the least (32 B / 56 B)
    ("fused_bwd_dkdv", "16-bit", 32): ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3)),
    ("fused_bwd_dkdv", "16-bit", 64): ((32, 4, 2), (64, 4, 2), (64, 8, 3)),
    ("fused_bwd_dkdv", "16-bit", 128): ((64, 8, 3),),
    ("fused_bwd_dkdv", "16-bit", 256): ((64, 8, 3),),  # none spill-free: least (144 B / 128 B)
}


def pruner(tuning_name: str, block_name: str):
    """The autotuner's ``early_config_prune``: the candidates that compile without spills for this
    launch's head-dim class and dtype (``SPILL_FREE``), never none.

    It reads only the launch's constexpr keywords (``BLOCK_D``, and ``IEEE``, set exactly for fp32
    inputs), plain ints and bools, so ``torch.compile`` can trace it too.
    """

    def early_config_prune(configs, named_args, **kwargs):
        survivors = spill_free(tuning_name, kwargs.get("BLOCK_D"), bool(kwargs.get("IEEE")))
        if survivors is None:
            return configs
        kept = [c for c in configs if candidate_of(c, block_name) in survivors]
        # Configs the table does not list (the interpreter's single one): keep the safest, the
        # smallest block on the most warps.
        return kept or [min(configs, key=lambda c: (c.kwargs.get(block_name), -c.num_warps, c.num_stages))]

    return early_config_prune


def autotuned(kernel, block_name: str, tuning_name: str, outputs: tuple[str, ...]):
    """``kernel`` autotuned over its halo block size ``block_name`` (and warps/stages).

    A shipped/user tuning table (``kernels.tuning``) is asked first, per launch; on a miss the
    autotuner runs as before. Configs that do not fit (e.g. 128-key blocks with head_dim 256) fail
    to compile with OutOfResources, which the autotuner scores as infinitely slow; the 32-key
    config always fits.
    """
    return tuning.autotune(configs=_configs(block_name, tuning_name), key=AUTOTUNE_KEY, name=tuning_name,
                           dtype_of="q_ptr", outputs=outputs,
                           prune=pruner(tuning_name, block_name))(kernel)


# Rows of head_dim * element size above this get half-size tiles: a 64-row fp32 tile of 256-wide
# heads (k, v, dk, dv in the key-centric backward) does not fit in an H100's shared memory.
WIDE_ROW_BYTES = 512


def tile_tokens(block_d: int, element_size: int) -> int:
    return TILE_TOKENS if block_d * element_size <= WIDE_ROW_BYTES else TILE_TOKENS // 2


def tile_shape(spatial3: tuple[int, int, int], dilation3: tuple[int, int, int], ndim: int,
               tokens: int = TILE_TOKENS) -> tuple[int, int, int]:
    """Tile extent per axis (powers of two, product in [16, tokens]), in sub-grid tokens.

    Start from a cube-like tile over the used axes (64: 64, 8x8, 4x4x4; 32: 32, 4x8, 2x4x4),
    shrink axes longer than the sub-grid, then give the freed room to axes that still have tokens,
    so that a tile stays about ``tokens`` queries and never under MIN_DOT (a tl.dot operand size).
    """
    base = {1: [1, 1, tokens], 2: [1, 8, 8], 3: [4, 4, 4]}[ndim]
    while math.prod(base) > tokens:
        base[min(range(3), key=lambda a: (-base[a], a))] //= 2  # halve the longest axis, outer first
    room = [triton.next_power_of_2(math.ceil(n / d)) for n, d in zip(spatial3, dilation3)]
    tile = [min(t, r) for t, r in zip(base, room)]
    while math.prod(tile) < tokens:
        growable = [a for a in (2, 1, 0) if tile[a] < room[a]]
        if not growable:
            break
        tile[min(growable, key=lambda a: tile[a])] *= 2
    while math.prod(tile) < MIN_DOT:
        tile[2] *= 2
    return tuple(tile)


def query_halo_pitch(spatial3, dilation3, kernel3, tile) -> tuple[int, int]:
    """Compile-time pitch ``(P1, P2)`` of the walk over a query tile's key halo (``_tiles.halo_steps``).

    Along an axis the halo of ``T`` queries holds at most ``T + K - 1`` keys (window starts step by
    0 or 1) and never more than the sub-grid; a 7-wide sub-grid therefore gets pitch 8, not 16.
    """
    return tuple(triton.next_power_of_2(min(t + k - 1, math.ceil(n / d)))
                 for n, d, k, t in zip(spatial3[1:], dilation3[1:], kernel3[1:], tile[1:]))


def _inverse_run(jp: int, length_g: int, k: int, causal: bool) -> tuple[int, int]:
    """First and last sub-grid query whose window holds sub-grid key ``jp`` (the rule of
    ``triton_geometry.subgrid_inverse_first/last``; ``tests/test_fused.py`` checks it against
    ``geometry.axis_tables``)."""
    if causal:
        return jp, min(jp + k - 1, length_g - 1)
    first = 0 if jp - (k - 1) <= 0 else jp - (k - 1) + k // 2
    last = length_g - 1 if jp >= length_g - k else jp + k // 2
    return first, last


def key_halo_extent(length: int, dilation: int, k: int, causal: bool, t: int) -> int:
    """Most queries along one axis in the union of a key tile's inverse neighbourhoods, over every
    tile of ``t`` keys and every dilation group. Near a border it can exceed ``t + k - 1`` (the
    windows there are shifted inward), so it is counted rather than bounded."""
    most = 1
    for length_g in {length // dilation, math.ceil(length / dilation)} - {0}:
        for a in range(0, length_g, t):
            first, _ = _inverse_run(a, length_g, k, causal)
            _, last = _inverse_run(min(a + t, length_g) - 1, length_g, k, causal)
            most = max(most, last - first + 1)
    return most


def key_halo_pitch(spatial3, dilation3, kernel3, causal3, tile) -> tuple[int, int]:
    """Compile-time pitch ``(P1, P2)`` of the walk over a key tile's query halo."""
    return tuple(triton.next_power_of_2(key_halo_extent(n, d, k, c, t))
                 for n, d, k, c, t in zip(spatial3[1:], dilation3[1:], kernel3[1:], causal3[1:], tile[1:]))


def num_tiles(spatial3, dilation3, tile) -> int:
    """Programs along the tile axis: tiles of the largest sub-grid, times the dilation groups."""
    per_group = math.prod(triton.cdiv(triton.cdiv(n, d), t) for n, d, t in zip(spatial3, dilation3, tile))
    return per_group * math.prod(dilation3)


def block_d(head_dim: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(head_dim))
