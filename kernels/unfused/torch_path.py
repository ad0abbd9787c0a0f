"""The unfused ops' forward and backward formulas in plain PyTorch, for CPU without Triton.

The custom ops run these instead of the Triton kernels on CPU when the interpreter is off, and
while ``torch.compile``/``opcheck`` trace CPU tensors (fake tensors have no data for the
interpreter). Built from ``kernels.reference``'s window products (one PyTorch formula per
quantity) on ``geometry.neighborhood``'s tables; the backward scatters with ``index_add_``, which is
deterministic on CPU. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from ..geometry import NAParams, neighborhood
from ..reference import flatten, gather_dot, window_logits, window_sum, zero_unused


def _tables(spatial, params: NAParams, like: torch.Tensor):
    """``geometry.neighborhood`` tables on ``like``'s device.

    The tables are cached real CPU tensors. While tracing (``like`` is a fake tensor) they are
    rebuilt from Python data inside the fake mode, which tracers record as graph constants.
    """
    spatial = tuple(int(s) for s in spatial)  # the tables are per shape: specialise symbolic sizes
    if not is_fake(like):
        return neighborhood(spatial, params, like.device)
    with unset_fake_temporarily():
        data = [None if t is None else (t.tolist(), t.dtype) for t in neighborhood(spatial, params, "cpu")]
    return tuple(None if d is None else torch.tensor(d[0], dtype=d[1], device=like.device) for d in data)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, *spatial, H, X] -> [B, N, H, X] in float32."""
    return flatten(x, torch.float32)


def _inverse_sum(weights, x, index, like: torch.Tensor) -> torch.Tensor:
    """The transpose of ``window_sum``: token ``m`` gets ``sum weights[n, k] * x[n]`` over the
    (query ``n``, slot ``k``) pairs with ``index[n, k] == m``; ``like`` gives the flat key shape."""
    per_slot = torch.einsum("bnhk,bnhd->bnkhd", weights, x).flatten(1, 2)  # [B, N*K, H, D]
    return torch.zeros_like(like).index_add_(1, index.reshape(-1), per_slot)


def qk_forward(query, key, rpb, params: NAParams, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    tables = _tables(query.shape[1:-2], params, query)
    logits = window_logits(_flat(query), _flat(key), tables, rpb, scale)
    return logits.reshape(*query.shape[:-1], params.num_neighbors).to(out_dtype)


def qk_backward(grad_logits, query, key, params: NAParams, scale: float):
    tables = _tables(query.shape[1:-2], params, query)
    index, valid, _ = tables
    g = zero_unused(_flat(grad_logits), valid) * scale
    q, k = _flat(query), _flat(key)
    dq = window_sum(g, k, tables)
    dk = _inverse_sum(g, q, index, k)
    return dq.reshape(query.shape).to(query.dtype), dk.reshape(key.shape).to(key.dtype)


def rpb_backward(grad_logits, params: NAParams) -> torch.Tensor:
    _, valid, rpb_bin = _tables(grad_logits.shape[1:-2], params, grad_logits)
    g = zero_unused(_flat(grad_logits), valid).sum(0).permute(1, 0, 2)  # [H, N, K]
    heads = g.shape[0]
    bins = [2 * k - 1 for k in params.kernel_size]
    out = g.new_zeros(heads, math.prod(bins))
    out.index_add_(1, rpb_bin.reshape(-1), g.reshape(heads, -1))
    return out.reshape(heads, *bins)


def av_forward(attn, value, params: NAParams) -> torch.Tensor:
    tables = _tables(value.shape[1:-2], params, value)
    out = window_sum(_flat(attn), _flat(value), tables)
    return out.reshape(value.shape).to(value.dtype)


def av_backward(grad_out, attn, value, params: NAParams):
    index, valid, _ = _tables(value.shape[1:-2], params, value)
    go, v = _flat(grad_out), _flat(value)
    d_attn = zero_unused(gather_dot(go, v, index), valid)
    d_value = _inverse_sum(zero_unused(_flat(attn), valid), go, index, v)
    return d_attn.reshape(attn.shape).to(attn.dtype), d_value.reshape(value.shape).to(value.dtype)
