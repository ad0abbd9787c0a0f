"""Reference (dilated) neighborhood attention in plain PyTorch: the ground truth.

Built from gathered neighbour indices (``geometry.neighborhood``), so memory is O(N * K * D), not
O(N^2): a DiNAT-tiny layer at 56x56 runs on a CPU. Differentiable by autograd, on any device.
Computation happens in float32 (float64 for float64 inputs); outputs come back in the input dtype.
Inputs are assumed validated by ``kernels.api``.
"""

from __future__ import annotations

import torch

from .geometry import NAParams, neighborhood

__all__ = ["na", "qk", "av", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    return None  # runs anywhere


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _flatten(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, *spatial, H, D] -> [B, N, H, D] in the compute dtype."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).to(dtype)


def _logits(query, key, params: NAParams, rpb, scale, dtype):
    """Masked logits ``[B, N, H, K]`` (``scale * q.k + rpb``, ``-inf`` on unused causal slots)."""
    spatial = query.shape[1:-2]
    index, valid, rpb_index = neighborhood(spatial, params, query.device)
    q = _flatten(query, dtype)
    k = _flatten(key, dtype)[:, index]  # [B, N, K, H, D]
    logits = torch.einsum("bnhd,bnkhd->bnhk", q, k)
    if scale != 1.0:
        logits = logits * scale
    if rpb is not None:
        bias = rpb.reshape(rpb.shape[0], -1).to(dtype)[:, rpb_index]  # [H, N, K]
        logits = logits + bias.permute(1, 0, 2)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits, index, valid


def _weighted_sum(weights, value, index, valid, dtype):
    """``sum_k weights[..., k] * value[neighbour k]`` -> ``[B, N, H, D]``."""
    if valid is not None:
        weights = weights.masked_fill(~valid[:, None, :], 0.0)
    v = _flatten(value, dtype)[:, index]  # [B, N, K, H, D]
    return torch.einsum("bnhk,bnkhd->bnhd", weights, v)


def qk(query, key, params: NAParams, rpb=None):
    dtype = _compute_dtype(query.dtype)
    logits, _, _ = _logits(query, key, params, rpb, 1.0, dtype)
    return logits.reshape(*query.shape[:-1], params.num_neighbors).to(query.dtype)


def av(attn, value, params: NAParams):
    dtype = _compute_dtype(value.dtype)
    spatial = value.shape[1:-2]
    index, valid, _ = neighborhood(spatial, params, value.device)
    weights = attn.reshape(attn.shape[0], -1, attn.shape[-2], attn.shape[-1]).to(dtype)
    out = _weighted_sum(weights, value, index, valid, dtype)
    return out.reshape(value.shape).to(value.dtype)


def na(query, key, value, params: NAParams, rpb=None, scale: float = 1.0, return_lse: bool = False):
    dtype = _compute_dtype(query.dtype)
    logits, index, valid = _logits(query, key, params, rpb, scale, dtype)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = _weighted_sum(torch.exp(logits - lse), value, index, valid, dtype)
    out = out.reshape(value.shape).to(value.dtype)
    if return_lse:
        return out, lse.squeeze(-1).reshape(query.shape[:-1]).float()
    return out
