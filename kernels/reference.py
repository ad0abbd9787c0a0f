"""Reference (dilated) neighborhood attention in plain PyTorch: the ground truth.

Built from gathered neighbour indices (``geometry.neighborhood``), so memory is O(N * K * D), not
O(N^2): a DiNAT-tiny layer at 56x56 runs on a CPU. Differentiable by autograd, on any device.
Computation happens in float32 (float64 for float64 inputs); outputs come back in the input dtype.
Inputs are assumed validated by ``kernels.api``.

The window products below (``window_logits``, ``window_sum``, ``gather_dot``) are the one PyTorch
spelling of each quantity: ``unfused.torch_path`` builds its forward and backward formulas from
them, and the fused ops' CPU backward differentiates ``na`` itself.
"""

from __future__ import annotations

import torch

from .geometry import NAParams, neighborhood

__all__ = ["na", "qk", "av", "unavailable_reason", "flatten", "gather_dot", "window_logits", "window_sum", "zero_unused"]


def unavailable_reason(device: torch.device) -> str | None:
    return None  # runs anywhere


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def flatten(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, *spatial, H, X] -> [B, N, H, X] in ``dtype``."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).to(dtype)


def zero_unused(weights: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, N, H, K]`` with the unused causal slots (``valid`` False) set to 0."""
    return weights if valid is None else weights.masked_fill(~valid[:, None, :], 0.0)


def gather_dot(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[n] . y[index[n, k]]`` per head: ``[B, N, H, D]`` x ``[B, N, H, D]`` -> ``[B, N, H, K]``."""
    return torch.einsum("bnhd,bnkhd->bnhk", x, y[:, index])


def window_logits(query, key, tables, rpb, scale: float) -> torch.Tensor:
    """Masked logits ``[B, N, H, K]``: ``scale * q.k + rpb``, ``-inf`` on unused causal slots.

    ``query``/``key`` are flattened ``[B, N, H, D]`` in the compute dtype; ``tables`` is
    ``geometry.neighborhood``'s ``(index, valid, rpb_bin)``.
    """
    index, valid, rpb_bin = tables
    logits = gather_dot(query, key, index)
    if scale != 1.0:
        logits = logits * scale
    if rpb is not None:
        bias = rpb.reshape(rpb.shape[0], -1).to(logits.dtype)[:, rpb_bin]  # [H, N, K]
        logits = logits + bias.permute(1, 0, 2)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits


def window_sum(weights, value, tables) -> torch.Tensor:
    """``sum_k weights[..., k] * value[neighbour k]`` -> ``[B, N, H, D]`` (unused slots ignored).

    ``weights`` is ``[B, N, H, K]``, ``value`` flattened ``[B, N, H, D]``, both in the compute dtype.
    """
    index, valid, _ = tables
    return torch.einsum("bnhk,bnkhd->bnhd", zero_unused(weights, valid), value[:, index])


def qk(query, key, params: NAParams, rpb=None):
    dtype = _compute_dtype(query.dtype)
    tables = neighborhood(query.shape[1:-2], params, query.device)
    logits = window_logits(flatten(query, dtype), flatten(key, dtype), tables, rpb, 1.0)
    return logits.reshape(*query.shape[:-1], params.num_neighbors).to(query.dtype)


def av(attn, value, params: NAParams):
    dtype = _compute_dtype(value.dtype)
    tables = neighborhood(value.shape[1:-2], params, value.device)
    out = window_sum(flatten(attn, dtype), flatten(value, dtype), tables)
    return out.reshape(value.shape).to(value.dtype)


def na(query, key, value, params: NAParams, rpb=None, scale: float = 1.0, return_lse: bool = False):
    dtype = _compute_dtype(query.dtype)
    tables = neighborhood(query.shape[1:-2], params, query.device)
    logits = window_logits(flatten(query, dtype), flatten(key, dtype), tables, rpb, scale)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = window_sum(torch.exp(logits - lse), flatten(value, dtype), tables)
    out = out.reshape(value.shape).to(value.dtype)
    if return_lse:
        return out, lse.squeeze(-1).reshape(query.shape[:-1]).float()
    return out
