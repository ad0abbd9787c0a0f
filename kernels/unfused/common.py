"""Host-side helpers shared by the unfused kernels: kernel arguments, configs, launch.

Every kernel is written once for three spatial axes: problems arrive padded (``triton_utils.Padded3``).
"""

from __future__ import annotations

import contextlib

import torch
import triton

from .. import tuning
from ..offsets import INT32_MAX, batch_slices, element_span, int64_offsets
from ..tuning import launch
from ..triton_utils import Padded3, interpreted

# Head-dim lanes handled per step; larger head dims loop over chunks of this many lanes (the
# padded lanes of the last chunk are masked), so the register tile never exceeds BLOCK_N x 64.
MAX_CHUNK_D = 64


def require_int32_span(x: torch.Tensor) -> None:
    """ValueError for a kernel without an ``INT64_OFFSETS`` specialisation (the dRPB reduction)
    when one batch element of ``x`` spans more than int32 offsets reach."""
    span = element_span(x)
    if span > INT32_MAX:
        raise ValueError(
            f"backend='unfused': one batch element of a {tuple(x.shape)} tensor spans {span} elements; "
            f"the dRPB reduction indexes within a batch element in int32 (at most {INT32_MAX})"
        )


def head_dim_chunk(head_dim: int) -> int:
    """``CHUNK_D``: head-dim lanes a row kernel handles per step (the fused kernels' ``BLOCK_D``, by
    contrast, covers the whole padded head dim)."""
    return min(triton.next_power_of_2(head_dim), MAX_CHUNK_D)


# The largest row tile of ``row_configs``.
MAX_BLOCK_N = 256


def row_configs() -> list[triton.Config]:
    """Autotune candidates for the kernels that tile queries/keys in rows of ``BLOCK_N``.

    The tile size only changes how work is split, never the order of any sum, so every config
    gives bit-identical results. The interpreter gets one large tile (fewer Python-level programs).
    """
    if interpreted():
        return [triton.Config({"BLOCK_N": MAX_BLOCK_N}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (32, 64, 128) for w in (4, 8)]


# What the row kernels' autotuners are keyed on (the tile splits rows; the window sets the work per row).
AUTOTUNE_KEY = ["N", "head_dim", "K0", "K1", "K2"]


def tuned(name: str, dtype_of: str):
    """``triton.autotune`` over ``row_configs()`` that asks the tuning tables first (``kernels.tuning``).

    ``dtype_of`` names the tensor argument whose dtype keys the table. Every row kernel writes only
    ``out_ptr``.
    """
    return tuning.autotune(configs=row_configs(), key=AUTOTUNE_KEY, name=name, dtype_of=dtype_of, outputs=("out_ptr",))


def on_device_of(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device), a no-op elsewhere."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def launch_rows(kernel, make_args, batched: tuple, rows: torch.Tensor, out: torch.Tensor, geo: Padded3,
                scale: float, **flags) -> None:
    """Launch a row kernel over its grid ``(cdiv(N, BLOCK_N), batch * heads)``.

    ``make_args(*batched)`` gives the kernel's tensor and stride keyword arguments for ``batched``, the
    ``[B, ...]`` tensors it indexes (sliced along the batch when ``batch * heads`` programs exceed
    CUDA's grid axis 1: ``kernels.offsets.batch_slices``); ``rows`` (``[B, *spatial, H, D]``)
    gives heads and head dim; ``out`` is the tensor the kernel writes; ``flags`` are the kernel's
    own constexprs (passed before ``CHUNK_D``). ``INT64_OFFSETS`` is chosen from all of them.
    """
    heads, head_dim = rows.shape[-2], rows.shape[-1]
    n = geo.num_tokens
    if n + MAX_BLOCK_N > INT32_MAX:
        # Token numbers stay int32 even in the 64-bit specialisation: int64 coordinates would cost
        # 64-bit divisions in every window loop, for maps that only the fused kernels handle well.
        raise ValueError(f"backend='unfused': a batch element holds {n} tokens; the row kernels number tokens "
                         f"in int32 (at most {INT32_MAX - MAX_BLOCK_N}); use backend='fused'")
    int64 = int64_offsets(*batched)
    with on_device_of(out):
        for batch, part in batch_slices(batched, rows.shape[0], heads, "unfused"):
            def grid(meta, batch=batch):
                return (triton.cdiv(n, meta["BLOCK_N"]), batch * heads)

            launch(kernel, grid, (), dict(**make_args(*part),
                N=n, H=heads, scale=float(scale), head_dim=head_dim, **flags, INT64_OFFSETS=int64,
                CHUNK_D=head_dim_chunk(head_dim), **geo.shape_args()))
