"""dRPB: ``drpb[h, r] = sum over (b, i, t) with rel(i, t) = r of g[b, i, h, t]``, deterministic, no atomics.

The sum runs over the slots that take part: a causal query's slots past itself are skipped (their
gradient is ignored, as in the reference and ``torch_path``).

Along one axis, the bias bin of slot ``t`` of query ``i`` is ``o(i) + t`` with the query's *class*
``o(i) = rpb_offset(i, window_start(i))`` in ``[0, k)``. ``o`` is constant on ``k`` contiguous
runs of tokens (``window_start`` is a clamp of ``i // d``; see ``axis_piece``): the ``k - 1``
border runs of ``d`` tokens each (one per sub-grid distance to the near border) and the interior
run between them. A *box* -- a product of one run (piece of a run) per axis -- therefore holds
queries that all map slot ``t`` to the same bin, so summing a box needs no index arithmetic per
element: the kernel adds whole logit rows ``g[b, i, h, :]`` into a ``[batch lanes, slots]``
accumulator, reduces the lanes once and writes the box's slot sums to their bins.

Programs are (box, head, batch block); each writes its own row of ``partial[boxes x batch blocks,
heads, bins]`` (zeros outside its window of bins), and the rows are added in a fixed order.
The tiling depends on the window geometry only, never on the batch, so the grid's second axis
is the only one that grows with batch and heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tuning import run_kernel
from ..triton_utils import Padded3
from .common import on_device_of, require_int32_span

# Fixed tiles (never autotuned): they fix the order in which every bin is summed.
BATCH_LANES = 32  # batch elements per program (one accumulator row each)
MAX_BLOCK_T = 64  # window slots per step; larger windows loop over chunks of slots
TILE_ELEMENTS = 2048  # target accumulator size; leftover lanes go to consecutive tokens of the last axis
# Steps (of one token, or of BLOCK_X tokens on the last axis) a box spans at most per real axis:
# about 16 steps per program, so the big interior run is cut into many programs of similar work.
PIECE_STEPS = {1: (16,), 2: (4, 4), 3: (2, 2, 4)}


@triton.jit
def axis_piece(s, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr,
               border_pieces, interior_pieces, border_piece, interior_piece):
    """Tokens ``[lo, hi)`` of piece ``s`` of an axis, and their class ``o`` (the bin of slot 0).

    An axis has ``k`` runs of one class each, in token order: ``run = m < INTERIOR`` holds the
    tokens ``[m * d, (m + 1) * d)`` (sub-grid distance ``m`` to the start, ``o = k - 1 - m``);
    ``run = INTERIOR`` the interior; ``run > INTERIOR`` the ``d`` tokens at sub-grid distance
    ``k - 1 - run`` to the end, whose class is that distance. So ``o = k - 1 - run`` throughout.
    ``INTERIOR`` is ``k - 1`` when causal (``start' = max(i' - k + 1, 0)``: no end border) and
    ``k // 2`` otherwise (``start' = clamp(i' - k // 2, 0, L_g - k)``; the runs do not overlap
    because ``L_g >= k`` in every group when ``k * d <= length``). Border runs are cut into
    ``border_pieces`` pieces of at most ``border_piece`` tokens, the interior into
    ``interior_pieces`` of at most ``interior_piece``.
    """
    INTERIOR: tl.constexpr = KERNEL - 1 if CAUSAL else KERNEL // 2
    left = INTERIOR * border_pieces
    if s < left:
        run = s // border_pieces
        run_start = run * dilation
        lo = run_start + (s - run * border_pieces) * border_piece
        hi = tl.minimum(lo + border_piece, run_start + dilation)
    elif s < left + interior_pieces:
        run = s * 0 + INTERIOR  # a tensor, as in the other branches
        lo = INTERIOR * dilation + (s - left) * interior_piece
        hi = tl.minimum(lo + interior_piece, length - (KERNEL - 1 - INTERIOR) * dilation)
    else:
        r = s - left - interior_pieces
        right = r // border_pieces
        run = INTERIOR + 1 + right
        run_start = length - (KERNEL - run) * dilation
        lo = run_start + (r - right * border_pieces) * border_piece
        hi = tl.minimum(lo + border_piece, run_start + dilation)
    return lo, hi, KERNEL - 1 - run


@triton.jit
def _rpb_grad_kernel(
    g_ptr, partial_ptr,
    sgb, sg0, sg1, sg2, sgh, sgd,
    L0, L1, L2, D0, D1, D2, batch, H,
    NB0, NB1, NB2, NI0, NI1, NI2, PB0, PB1, PB2, PI0, PI1, PI2,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Slot sums of one box, one head and ``BLOCK_B`` batch elements, written to their bins.

    Grid ``(boxes, heads * batch blocks)``; ``NB*``/``NI*`` pieces per border/interior run,
    ``PB*``/``PI*`` their lengths (see ``axis_piece``).
    """
    NUM_SLOTS: tl.constexpr = K0 * K1 * K2
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    NUM_BINS: tl.constexpr = (2 * K0 - 1) * R1 * R2
    # Which box (once per program: the only divisions by runtime values).
    box = tl.program_id(0)
    pid = tl.program_id(1)
    h = pid % H
    batch_block = pid // H
    pieces2 = (K2 - 1) * NB2 + NI2
    pieces1 = (K1 - 1) * NB1 + NI1
    # Axes of one token (the padding of 1-D/2-D problems) are specialised away.
    lo0, hi0, o0 = 0, 1, 0
    if K0 > 1:
        lo0, hi0, o0 = axis_piece(box // (pieces1 * pieces2), L0, K0, D0, C0, NB0, NI0, PB0, PI0)
    lo1, hi1, o1 = 0, 1, 0
    if K1 > 1:
        lo1, hi1, o1 = axis_piece((box // pieces2) % pieces1, L1, K1, D1, C1, NB1, NI1, PB1, PI1)
    lo2, hi2, o2 = axis_piece(box % pieces2, L2, K2, D2, C2, NB2, NI2, PB2, PI2)
    # Lanes: BLOCK_B batch elements x BLOCK_X consecutive tokens of the last axis.
    lane = tl.arange(0, BLOCK_B * BLOCK_X)
    if BLOCK_X == 1:
        b = batch_block * BLOCK_B + lane
        lane_ptr = g_ptr + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    else:
        b = batch_block * BLOCK_B + lane // BLOCK_X
        x = lane % BLOCK_X
        lane_ptr = g_ptr + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + x * sg2
    out_row = partial_ptr + (box.to(tl.int64) * tl.num_programs(1) + pid) * NUM_BINS
    for t_begin in range(0, NUM_SLOTS, BLOCK_T):  # one trip unless the window has over BLOCK_T slots
        t = t_begin + tl.arange(0, BLOCK_T)
        t2 = t % K2
        t1 = (t // K2) % K1
        t0 = t // (K1 * K2)
        # Slots the box's queries use: all but, on a causal axis, those past the query itself
        # (slot t_a holds key start' + t_a <= i' iff t_a <= k - 1 - o_a: the same for the whole box).
        used = t < NUM_SLOTS
        if C0:
            used = used & (t0 <= K0 - 1 - o0)
        if C1:
            used = used & (t1 <= K1 - 1 - o1)
        if C2:
            used = used & (t2 <= K2 - 1 - o2)
        mask = (b < batch)[:, None] & used[None, :]  # loop-invariant
        tile = lane_ptr[:, None] + (t * sgd)[None, :]  # the box's rows are this tile plus one offset each
        acc = tl.zeros([BLOCK_B * BLOCK_X, BLOCK_T], dtype=tl.float32)
        for i0 in range(lo0, hi0):
            for i1 in range(lo1, hi1):
                row = i0 * sg0 + i1 * sg1
                for i2 in range(lo2, hi2, BLOCK_X):
                    if BLOCK_X == 1:
                        step_mask = mask
                    else:
                        step_mask = mask & (i2 + x < hi2)[:, None]
                    acc += tl.load(tile + (row + i2 * sg2), mask=step_mask, other=0.0).to(tl.float32)
        # Slot t's bin: the class plus the slot, per axis.
        bin = ((o0 + t0) * R1 + (o1 + t1)) * R2 + (o2 + t2)
        tl.store(out_row + bin, tl.sum(acc, axis=0), mask=t < NUM_SLOTS)


def _axis_tiling(length: int, kernel: int, dilation: int, max_piece: int) -> tuple[int, int, int, int]:
    """``(border_pieces, interior_pieces, border_piece, interior_piece)`` of one axis (see ``axis_piece``)."""
    interior = length - (kernel - 1) * dilation  # >= dilation: the API checks kernel * dilation <= length
    border_pieces, interior_pieces = triton.cdiv(dilation, max_piece), triton.cdiv(interior, max_piece)
    return border_pieces, interior_pieces, triton.cdiv(dilation, border_pieces), triton.cdiv(interior, interior_pieces)


def rpb_grad(grad_logits: torch.Tensor, geo: Padded3) -> torch.Tensor:
    """dRPB ``[H, *(2k-1)]`` in float32 from the logits gradient ``[B, *spatial, H, K]``.

    Programs write partials ``[boxes x batch blocks, H, bins]`` (see the module doc), which are
    then added in a fixed order: deterministic, no atomics.
    """
    batch, heads = grad_logits.shape[0], grad_logits.shape[-2]
    bins = tuple(2 * k - 1 for k in geo.kernel_size[3 - geo.ndim:])
    if batch == 0 or heads == 0 or geo.num_tokens == 0:
        return grad_logits.new_zeros((heads, *bins), dtype=torch.float32)
    block_t = min(triton.next_power_of_2(geo.num_slots), MAX_BLOCK_T)
    block_x = max(1, TILE_ELEMENTS // (BATCH_LANES * block_t))
    steps = (1,) * (3 - geo.ndim) + PIECE_STEPS[geo.ndim]
    tiling = [_axis_tiling(length, k, d, step * (block_x if axis == 2 else 1))
              for axis, (length, k, d, step) in enumerate(zip(geo.spatial, geo.kernel_size, geo.dilation, steps))]
    boxes = 1
    for (border_pieces, interior_pieces, _, _), k in zip(tiling, geo.kernel_size):
        boxes *= (k - 1) * border_pieces + interior_pieces
    batch_blocks = triton.cdiv(batch, BATCH_LANES)
    partial = torch.zeros((boxes * batch_blocks, heads, geo.rpb_bins), dtype=torch.float32, device=grad_logits.device)
    args = dict(batch=batch, H=heads, BLOCK_B=BATCH_LANES, BLOCK_X=block_x, BLOCK_T=block_t, **geo.shape_args())
    for name, column in zip(("NB", "NI", "PB", "PI"), zip(*tiling)):
        args.update({f"{name}{axis}": value for axis, value in enumerate(column)})
    require_int32_span(grad_logits)  # offsets inside a batch element are int32 here
    with on_device_of(partial):
        run_kernel(_rpb_grad_kernel, (boxes, heads * batch_blocks), (),
                   dict(g_ptr=grad_logits, partial_ptr=partial, **geo.stride_args(g=grad_logits), **args))
    return partial.sum(0).reshape(heads, *bins)
