"""The unfused NA kernels as PyTorch custom ops (namespace ``dinat``), with autograd and FLOPs.

Ops (all functional, registered with ``torch.library.triton_op`` so ``torch.compile`` sees the
Triton kernels on GPU):

* ``dinat::na_qk(query, key, rpb, kernel_size, dilation, is_causal, scale, float32_logits)``
  -> ``scale * q.k + rpb`` per window slot, ``[B, *spatial, H, K]`` (float32 or the input dtype).
* ``dinat::na_av(attn, value, kernel_size, dilation, is_causal)`` -> ``[B, *spatial, H, D]``.
* backward ops ``dinat::na_qk_backward`` (dQ, dK), ``dinat::na_rpb_backward`` (dRPB, float32) and
  ``dinat::na_av_backward`` (d(attn), dV), wired up with ``register_autograd``.

Where the kernels run: CUDA tensors always use Triton. CPU tensors use Triton through the
interpreter when ``TRITON_INTERPRET=1`` and the tensors hold data; otherwise (interpreter off, or
fake tensors while ``torch.compile``/``opcheck`` trace) they use ``torch_path``, the same formulas
in plain PyTorch, so CPU graphs trace without breaks.
"""

import math
from typing import Optional

import torch
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from . import torch_path
from .av_kernels import inverse_sum, window_sum
from .qk_kernels import window_dot
from .rpb_kernels import rpb_grad
from ..triton_utils import Padded3, na_params, use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='unfused': {name} must be float16, bfloat16 or float32 (the kernels accumulate "
            f"in float32); got {x.dtype}. Use backend='reference' for float64."
        )


# ---------------------------------------------------------------------------------------------
# QK (+RPB)


@triton_op("dinat::na_qk", mutates_args=())
def na_qk(query: torch.Tensor, key: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: list[int],
          dilation: list[int], is_causal: list[bool], scale: float, float32_logits: bool) -> torch.Tensor:
    check_dtype("query", query)
    params = na_params(kernel_size, dilation, is_causal)
    out_dtype = torch.float32 if float32_logits else query.dtype
    if not use_triton(query, key, rpb):
        return torch_path.qk_forward(query, key, rpb, params, scale, out_dtype)
    out = query.new_empty((*query.shape[:-1], params.num_neighbors), dtype=out_dtype)
    return window_dot(query, key, rpb, Padded3.of(query.shape[1:-2], params), scale, True, out)


@triton_op("dinat::na_qk_backward", mutates_args=())
def na_qk_backward(grad_logits: torch.Tensor, query: torch.Tensor, key: torch.Tensor, kernel_size: list[int],
                   dilation: list[int], is_causal: list[bool], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    params = na_params(kernel_size, dilation, is_causal)
    if not use_triton(grad_logits, query, key):
        return torch_path.qk_backward(grad_logits, query, key, params, scale)
    geo = Padded3.of(query.shape[1:-2], params)
    d_query = window_sum(grad_logits, key, geo, scale, query.new_empty(query.shape))
    d_key = inverse_sum(grad_logits, query, geo, scale, key.new_empty(key.shape))
    return d_query, d_key


@triton_op("dinat::na_rpb_backward", mutates_args=())
def na_rpb_backward(grad_logits: torch.Tensor, kernel_size: list[int], dilation: list[int],
                    is_causal: list[bool]) -> torch.Tensor:
    params = na_params(kernel_size, dilation, is_causal)
    if not use_triton(grad_logits):
        return torch_path.rpb_backward(grad_logits, params)
    return rpb_grad(grad_logits, Padded3.of(grad_logits.shape[1:-2], params))


def _qk_setup_context(ctx, inputs, output):
    query, key, rpb, kernel_size, dilation, is_causal, scale, _ = inputs
    ctx.save_for_backward(query, key)
    ctx.geometry = (kernel_size, dilation, is_causal)
    ctx.scale = scale
    ctx.rpb_dtype = None if rpb is None else rpb.dtype


def _qk_backward(ctx, grad_logits):
    query, key = ctx.saved_tensors
    d_query = d_key = d_rpb = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        d_query, d_key = torch.ops.dinat.na_qk_backward(grad_logits, query, key, *ctx.geometry, ctx.scale)
    if ctx.needs_input_grad[2]:
        d_rpb = torch.ops.dinat.na_rpb_backward(grad_logits, *ctx.geometry).to(ctx.rpb_dtype)
    return d_query, d_key, d_rpb, None, None, None, None, None


na_qk.register_autograd(_qk_backward, setup_context=_qk_setup_context)


# ---------------------------------------------------------------------------------------------
# AV


@triton_op("dinat::na_av", mutates_args=())
def na_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: list[int], dilation: list[int],
          is_causal: list[bool]) -> torch.Tensor:
    check_dtype("value", value)
    check_dtype("attn", attn)
    params = na_params(kernel_size, dilation, is_causal)
    if not use_triton(attn, value):
        return torch_path.av_forward(attn, value, params)
    return window_sum(attn, value, Padded3.of(value.shape[1:-2], params), 1.0, value.new_empty(value.shape))


@triton_op("dinat::na_av_backward", mutates_args=())
def na_av_backward(grad_out: torch.Tensor, attn: torch.Tensor, value: torch.Tensor, kernel_size: list[int],
                   dilation: list[int], is_causal: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    params = na_params(kernel_size, dilation, is_causal)
    if not use_triton(grad_out, attn, value):
        return torch_path.av_backward(grad_out, attn, value, params)
    geo = Padded3.of(value.shape[1:-2], params)
    d_attn = window_dot(grad_out, value, None, geo, 1.0, False, attn.new_empty(attn.shape))
    d_value = inverse_sum(attn, grad_out, geo, 1.0, value.new_empty(value.shape))
    return d_attn, d_value


def _av_setup_context(ctx, inputs, output):
    attn, value, kernel_size, dilation, is_causal = inputs
    ctx.save_for_backward(attn, value)
    ctx.geometry = (kernel_size, dilation, is_causal)


def _av_backward(ctx, grad_out):
    attn, value = ctx.saved_tensors
    d_attn, d_value = torch.ops.dinat.na_av_backward(grad_out, attn, value, *ctx.geometry)
    return d_attn, d_value, None, None, None


na_av.register_autograd(_av_backward, setup_context=_av_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOPs: a multiply-add per (query, slot, head, lane), as for a matmul of the same size.


def window_flops(tensor_shape, num_neighbors: int) -> int:
    """``2 * B * N * H * K * D`` for a ``[B, *spatial, H, D]`` operand."""
    return 2 * math.prod(tensor_shape[:-1]) * num_neighbors * tensor_shape[-1]


@register_flop_formula(torch.ops.dinat.na_qk)
def _na_qk_flop(query_shape, key_shape, rpb_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return window_flops(query_shape, math.prod(kernel_size))


@register_flop_formula(torch.ops.dinat.na_av)
def _na_av_flop(attn_shape, value_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return window_flops(value_shape, math.prod(kernel_size))


@register_flop_formula(torch.ops.dinat.na_qk_backward)
def _na_qk_backward_flop(grad_shape, query_shape, key_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * window_flops(query_shape, math.prod(kernel_size))  # dQ and dK


@register_flop_formula(torch.ops.dinat.na_av_backward)
def _na_av_backward_flop(grad_shape, attn_shape, value_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * window_flops(value_shape, math.prod(kernel_size))  # d(attn) and dV
