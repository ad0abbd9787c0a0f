"""The fused kernels as ``dinat::`` custom ops with autograd.

``dinat::na_fused_fwd`` returns ``(out, lse)``; ``dinat::na_fused_bwd`` returns ``(dq, dk, dv,
drpb)``. Normally they are ``torch.library.triton_op``s: kernels launched through ``wrap_triton``,
so ``torch.compile`` traces into them (no graph break, Inductor sees the kernels). On CPU without
the interpreter the same functions fall back to ``kernels.reference``.

Under ``TRITON_INTERPRET=1`` ``wrap_triton`` launches eagerly even on fake tensors, so the ops are
registered as opaque ``torch.library.custom_op``s with explicit fake (shape) functions instead;
``torch.compile(fullgraph=True)`` then keeps them as single graph nodes that run the interpreter.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from .. import reference
from ..offsets import batch_slices, int64_offsets
from ..tuning import launch
from ..triton_utils import Padded3, interpreted, na_params, use_triton
from . import config
from .backward import na_bwd_dkdv_kernel, na_bwd_dq_kernel
from .forward import na_fwd_kernel


class _Problem:
    """A [B, *spatial, H, D] problem padded to 3 axes (``geo``), with the fused kernels' tiling."""

    def __init__(self, query: torch.Tensor, kernel_size, dilation, is_causal):
        self.geo = geo = Padded3.of(query.shape[1:-2], na_params(kernel_size, dilation, is_causal))
        self.batch, self.heads, self.head_dim = query.shape[0], query.shape[-2], query.shape[-1]
        self.block_d = config.block_d(self.head_dim)
        tokens = config.tile_tokens(self.block_d, query.element_size())
        self.tile = config.tile_shape(geo.spatial, geo.dilation, geo.ndim, tokens)
        self.num_tiles = config.num_tiles(geo.spatial, geo.dilation, self.tile)
        self.ieee = query.dtype == torch.float32
        self.query_pitch = config.query_halo_pitch(geo.spatial, geo.dilation, geo.kernel_size, self.tile)
        self.key_pitch = config.key_halo_pitch(geo.spatial, geo.dilation, geo.kernel_size, geo.is_causal, self.tile)

    def meta(self, has_rpb: bool, pitch: tuple[int, int], int64: bool, scale: float) -> dict:
        """The keyword arguments every fused kernel takes besides its tensors and their strides."""
        t0, t1, t2 = self.tile
        return dict(**self.geo.shape_args(), H=self.heads, head_dim=self.head_dim, scale=scale,
                    T0=t0, T1=t1, T2=t2, P1=pitch[0], P2=pitch[1],
                    HAS_RPB=has_rpb, BLOCK_D=self.block_d, IEEE=self.ieee, INT64_OFFSETS=int64)

    def batch_slices(self, *tensors: torch.Tensor) -> list[tuple[int, tuple]]:
        """(batch count, the tensors' batch slice) per launch: ``batch * heads`` programs per launch
        fit CUDA's grid axis 1 (``kernels.offsets.batch_chunks``)."""
        return batch_slices(tensors, self.batch, self.heads, "fused")


class _DrpbLayout:
    """Where the dQ kernel keeps dRPB: per query, window slot ``(s0 * SLOT1 + s1) * SLOT2 + s2`` of
    ``BLOCK_S``; per program, a row of ``(2*K0 - 1) x BLOCK_R1 x BLOCK_R2`` relative-position bins.

    1-D/2-D problems lay slots out on power-of-two pitches; 2-D tiles whose regrouped slots fill
    ``tl.dot`` operands (``DRPB_BY_AXES``) also take at least 16 bins per axis: the kernel maps slots
    to bins with two small products. Others (1-D, 3-D, thin tiles) gather them per (query, bin); 3-D
    keeps slots compact.
    """

    def __init__(self, p: _Problem):
        k0, k1, k2 = p.geo.kernel_size
        _, t1, t2 = p.tile
        self.rel = tuple(2 * k - 1 for k in p.geo.kernel_size)
        pitch1, pitch2 = triton.next_power_of_2(k1), triton.next_power_of_2(k2)
        by_axes = p.tile[0] == 1 and k0 == 1 and t1 * pitch1 >= config.MIN_DOT and t2 * pitch2 >= config.MIN_DOT
        # 1-D/2-D: power-of-two slots, which the kernel fills by window class (``backward.fold_block``).
        slot1, slot2 = (pitch1, pitch2) if p.tile[0] == 1 and k0 == 1 else (k1, k2)
        block_r1, block_r2 = (max(triton.next_power_of_2(r), config.MIN_DOT if by_axes else 1) for r in self.rel[1:])
        self.meta = dict(BLOCK_S=triton.next_power_of_2(k0 * slot1 * slot2), SLOT1=slot1, SLOT2=slot2,
                         BLOCK_R1=block_r1, BLOCK_R2=block_r2, DRPB_BY_AXES=by_axes)
        self.row = self.rel[0] * block_r1 * block_r2

    def bins(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., row]`` partial sums -> ``[..., 2K0-1, 2K1-1, 2K2-1]`` (the padding bins dropped)."""
        r0, r1, r2 = self.rel
        grid = rows.reshape(*rows.shape[:-1], r0, self.meta["BLOCK_R1"], self.meta["BLOCK_R2"])
        return grid[..., :r1, :r2]


def _register(name: str, fake):
    """``triton_op`` normally; an opaque ``custom_op`` + ``fake`` under the interpreter."""

    def wrap(fn):
        if not interpreted():
            return triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return wrap


def _fwd_fake(query, key, value, rpb, kernel_size, dilation, is_causal, scale):
    return (torch.empty(query.shape, dtype=query.dtype, device=query.device),
            torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device))


def _bwd_fake(grad_out, grad_lse, query, key, value, rpb, out, lse, kernel_size, dilation, is_causal, scale):
    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value)]
    if rpb is not None:
        grads.append(torch.empty(rpb.shape, dtype=rpb.dtype, device=rpb.device))
    else:
        grads.append(torch.empty(0, dtype=query.dtype, device=query.device))
    return tuple(grads)


@_register("dinat::na_fused_fwd", _fwd_fake)
def na_fused_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: Optional[torch.Tensor],
                 kernel_size: List[int], dilation: List[int], is_causal: List[bool],
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(query):
        return reference.na(query, key, value, na_params(kernel_size, dilation, is_causal), rpb, scale, True)
    p = _Problem(query, kernel_size, dilation, is_causal)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    has_rpb = rpb is not None
    rpb_arg = rpb.contiguous() if has_rpb else None  # HAS_RPB off: the kernel never touches it
    strides = p.geo.stride_args(q=query, k=key, v=value, o=out, l=lse)
    meta = p.meta(has_rpb, p.query_pitch, int64_offsets(query, key, value, out, lse), scale)
    for batch, (q_b, k_b, v_b, out_b, lse_b) in p.batch_slices(query, key, value, out, lse):
        launch(na_fwd_kernel, (p.num_tiles, batch * p.heads), (), dict(
            q_ptr=q_b, k_ptr=k_b, v_ptr=v_b, rpb_ptr=rpb_arg, o_ptr=out_b, lse_ptr=lse_b, **strides, **meta))
    return out, lse


@_register("dinat::na_fused_bwd", _bwd_fake)
def na_fused_bwd(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, rpb: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                 kernel_size: List[int], dilation: List[int], is_causal: List[bool],
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (out, lse) w.r.t. (query, key, value, rpb); drpb is empty without an RPB."""
    if not use_triton(query):
        return _reference_bwd(grad_out, grad_lse, query, key, value, rpb, kernel_size, dilation, is_causal, scale)
    p = _Problem(query, kernel_size, dilation, is_causal)
    has_rpb = rpb is not None
    lse = lse.contiguous()
    stats = torch.empty((*lse.shape, 2), dtype=torch.float32, device=query.device)  # (lse * log2 e, delta)
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(query.shape, dtype=key.dtype, device=query.device)
    dv = torch.empty(query.shape, dtype=value.dtype, device=query.device)
    drpb_layout = _DrpbLayout(p)
    rpb_arg = rpb.contiguous() if has_rpb else None
    has_dlse = grad_lse is not None
    dlse_arg = grad_lse.contiguous() if has_dlse else lse
    int64 = int64_offsets(query, key, value, out, grad_out, dq, dk, dv, lse, dlse_arg, stats)
    # dq/dk/dv (``sg*``) are contiguous like the query; lse and dlse (and stats, at twice the offset) share ``sl*``.
    dq_strides = p.geo.stride_args(q=query, k=key, v=value, o=out, do=grad_out, g=dq, l=lse)
    dkdv_strides = p.geo.stride_args(q=query, k=key, v=value, g=dk, do=grad_out, l=lse)
    partials = []
    for batch, (q_b, k_b, v_b, out_b, do_b, lse_b, dlse_b, dq_b, stats_b, dk_b, dv_b) in p.batch_slices(
            query, key, value, out, grad_out, lse, dlse_arg, dq, stats, dk, dv):
        partial = torch.zeros((p.num_tiles, batch, p.heads, drpb_layout.row) if has_rpb else (1,),
                              dtype=torch.float32, device=query.device)
        partials.append(partial)
        tensors = dict(q_ptr=q_b, k_ptr=k_b, v_ptr=v_b, rpb_ptr=rpb_arg, do_ptr=do_b, stats_ptr=stats_b)
        launch(na_bwd_dq_kernel, (p.num_tiles, batch * p.heads), (), dict(
            **tensors, o_ptr=out_b, lse_ptr=lse_b, dlse_ptr=dlse_b, dq_ptr=dq_b, drpb_ptr=partial,
            **dq_strides, HAS_DLSE=has_dlse, **drpb_layout.meta, **p.meta(has_rpb, p.query_pitch, int64, scale)))
        launch(na_bwd_dkdv_kernel, (p.num_tiles, batch * p.heads), (), dict(
            **tensors, dk_ptr=dk_b, dv_ptr=dv_b, **dkdv_strides, **p.meta(has_rpb, p.key_pitch, int64, scale)))
    if has_rpb:
        # Fixed-order sum over (tile, batch), then over launches: deterministic, unlike atomics.
        rows = partials[0].sum(dim=(0, 1))
        for partial in partials[1:]:
            rows = rows + partial.sum(dim=(0, 1))
        drpb = drpb_layout.bins(rows).reshape(rpb.shape).to(rpb.dtype).contiguous()
    else:
        drpb = torch.empty(0, dtype=query.dtype, device=query.device)
    return dq, dk, dv, drpb


def _reference_bwd(grad_out, grad_lse, query, key, value, rpb, kernel_size, dilation, is_causal, scale):
    """CPU without the interpreter: differentiate the reference (same maths, O(N*K*D) memory).

    ``torch.func.vjp`` rather than ``torch.autograd.grad``: a custom op's body runs below the
    autograd dispatch key, where plain autograd records nothing.
    """
    params = na_params(kernel_size, dilation, is_causal)
    inputs = (query, key, value) + ((rpb,) if rpb is not None else ())

    def forward(q, k, v, *bias):
        return reference.na(q, k, v, params, bias[0] if bias else None, scale, True)

    _, vjp = torch.func.vjp(forward, *inputs)
    grads = list(vjp((grad_out, grad_lse if grad_lse is not None else torch.zeros_like(_lse_like(query)))))
    if rpb is None:
        grads.append(torch.empty(0, dtype=query.dtype, device=query.device))
    return tuple(grads)


def _lse_like(query: torch.Tensor) -> torch.Tensor:
    return torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)


def _setup_context(ctx, inputs, output):
    query, key, value, rpb, kernel_size, dilation, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, rpb, out, lse)
    ctx.na_args = (list(kernel_size), list(dilation), list(is_causal), float(scale))
    ctx.has_rpb = rpb is not None


def _backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, drpb = torch.ops.dinat.na_fused_bwd(grad_out, grad_lse, query, key, value,
                                                    rpb if ctx.has_rpb else None, out, lse, *ctx.na_args)
    return dq, dk, dv, (drpb if ctx.has_rpb else None), None, None, None, None


na_fused_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.dinat.na_fused_fwd)
def _fwd_flops(query_shape, *args, **kwargs) -> int:
    """``q.k`` and ``p.v`` over every window slot: 4 * B * H * N * K * D."""
    kernel_size = args[3]
    return 4 * math.prod(query_shape) * math.prod(kernel_size)


@register_flop_formula(torch.ops.dinat.na_fused_bwd)
def _bwd_flops(grad_out_shape, *args, **kwargs) -> int:
    """Five window-sized products (logits, dP, dQ, dK, dV), 2.5x the forward, as for SDPA."""
    kernel_size = args[7]
    return 10 * math.prod(grad_out_shape) * math.prod(kernel_size)
