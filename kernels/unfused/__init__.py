"""Backend "unfused": Triton kernels that materialise the NA logits.

``na`` runs QK(+RPB, scaled inside the kernel) -> float32 softmax (PyTorch) -> AV. Forward and
backward are Triton kernels registered as ``dinat::`` custom ops (see ``ops``); dK, dV and dRPB are
gathered over inverse neighbourhoods / per bin, so gradients are bit-identical run to run.
Supports float16, bfloat16 and float32 (float32 accumulation); float64 is the reference's job.

Runs on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before triton was imported.
"""

from __future__ import annotations

import torch

from ..geometry import NAParams
from ..offsets import heads_limit_reason

try:
    from . import ops as _ops
    from ..triton_utils import interpreted as _interpreted
    _IMPORT_ERROR = None
except ImportError as exc:  # triton (or a torch new enough for triton_op) is missing
    _ops = None
    _IMPORT_ERROR = f"it cannot be imported ({exc})"

__all__ = ["unavailable_reason", "unsupported_reason", "qk", "av", "na"]


def unavailable_reason(device: torch.device) -> str | None:
    if _ops is None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        return "on CPU it needs the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"it runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {device.type}"


def unsupported_reason(tensor: torch.Tensor) -> str | None:
    """Why these kernels cannot take this problem (``backend="auto"`` then moves on)."""
    if tensor.dtype == torch.float64:
        return "float64 is not supported (the kernels take float16, bfloat16 or float32)"
    return heads_limit_reason(tensor.shape[-2]) if tensor.dim() >= 2 else None


def _geometry(params: NAParams):
    return list(params.kernel_size), list(params.dilation), list(params.is_causal)


def qk(query: torch.Tensor, key: torch.Tensor, params: NAParams, rpb: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled logits ``q.k (+ rpb)``, ``[B, *spatial, H, K]`` in the input dtype."""
    _ops.check_dtype("query", query)
    return torch.ops.dinat.na_qk(query, key, rpb, *_geometry(params), 1.0, False)


def av(attn: torch.Tensor, value: torch.Tensor, params: NAParams) -> torch.Tensor:
    """``sum_t attn[..., t] * value[neighbour t]``, ``[B, *spatial, H, D]``."""
    _ops.check_dtype("value", value)
    return torch.ops.dinat.na_av(attn, value, *_geometry(params))


def na(query, key, value, params: NAParams, rpb=None, scale: float = 1.0, return_lse: bool = False):
    """``softmax(scale * q.k + rpb) v`` with float32 logits and softmax; optionally the float32 LSE."""
    _ops.check_dtype("query", query)
    geometry = _geometry(params)
    logits = torch.ops.dinat.na_qk(query, key, rpb, *geometry, float(scale), True)
    out = torch.ops.dinat.na_av(torch.softmax(logits, dim=-1), value, *geometry)
    if return_lse:
        return out, torch.logsumexp(logits, dim=-1)
    return out
