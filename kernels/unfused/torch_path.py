"""The unfused ops' forward and backward formulas in plain PyTorch, for CPU without Triton.

The custom ops run these instead of the Triton kernels on CPU when the interpreter is off, and
while ``torch.compile``/``opcheck`` trace CPU tensors (fake tensors have no data for the
interpreter). Built on ``geometry.neighborhood`` like ``kernels.reference``; the backward scatters
with ``index_add_``, which is deterministic on CPU. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from ..geometry import NAParams, neighborhood


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
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).float()


def _zero_unused(w: torch.Tensor, valid) -> torch.Tensor:
    return w if valid is None else w.masked_fill(~valid[:, None, :], 0.0)


def qk_forward(query, key, rpb, params: NAParams, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    index, valid, rpb_index = _tables(query.shape[1:-2], params, query)
    logits = torch.einsum("bnhd,bnkhd->bnhk", _flat(query), _flat(key)[:, index]) * scale
    if rpb is not None:
        logits = logits + rpb.reshape(rpb.shape[0], -1).float()[:, rpb_index].permute(1, 0, 2)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits.reshape(*query.shape[:-1], params.num_neighbors).to(out_dtype)


def qk_backward(grad_logits, query, key, params: NAParams, scale: float):
    index, valid, _ = _tables(query.shape[1:-2], params, query)
    g = _zero_unused(_flat(grad_logits), valid) * scale
    q, k = _flat(query), _flat(key)
    dq = torch.einsum("bnhk,bnkhd->bnhd", g, k[:, index])
    per_slot = torch.einsum("bnhk,bnhd->bnkhd", g, q).flatten(1, 2)  # [B, N*K, H, D]
    dk = torch.zeros_like(k).index_add_(1, index.reshape(-1), per_slot)
    return dq.reshape(query.shape).to(query.dtype), dk.reshape(key.shape).to(key.dtype)


def rpb_backward(grad_logits, params: NAParams) -> torch.Tensor:
    _, valid, rpb_index = _tables(grad_logits.shape[1:-2], params, grad_logits)
    g = _zero_unused(_flat(grad_logits), valid).sum(0).permute(1, 0, 2)  # [H, N, K]
    heads = g.shape[0]
    bins = [2 * k - 1 for k in params.kernel_size]
    out = g.new_zeros(heads, math.prod(bins))
    out.index_add_(1, rpb_index.reshape(-1), g.reshape(heads, -1))
    return out.reshape(heads, *bins)


def av_forward(attn, value, params: NAParams) -> torch.Tensor:
    index, valid, _ = _tables(value.shape[1:-2], params, value)
    w = _zero_unused(_flat(attn), valid)
    out = torch.einsum("bnhk,bnkhd->bnhd", w, _flat(value)[:, index])
    return out.reshape(value.shape).to(value.dtype)


def av_backward(grad_out, attn, value, params: NAParams):
    index, valid, _ = _tables(value.shape[1:-2], params, value)
    go, v = _flat(grad_out), _flat(value)
    d_attn = _zero_unused(torch.einsum("bnhd,bnkhd->bnhk", go, v[:, index]), valid)
    per_slot = torch.einsum("bnhk,bnhd->bnkhd", _zero_unused(_flat(attn), valid), go).flatten(1, 2)
    d_value = torch.zeros_like(v).index_add_(1, index.reshape(-1), per_slot)
    return d_attn.reshape(attn.shape).to(attn.dtype), d_value.reshape(value.shape).to(value.dtype)
