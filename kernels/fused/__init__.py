"""Fused (flash-style) neighborhood attention in Triton: forward and deterministic backward.

Backend ``"fused"`` of ``kernels.naXd``. One kernel computes ``softmax(scale * q.k + rpb) v``
for a multi-dimensional tile of queries from the union of their windows, with an online softmax;
nothing of size [N, K] is ever stored. The backward recomputes probabilities from the saved
logsumexp in a query-centric pass (dQ, dRPB partials) and a key-centric pass (dK, dV).

Supported: 1-D/2-D/3-D, per-axis kernel size / dilation / causality, RPB, float16 / bfloat16 /
float32 (fp32 accumulation), any head_dim up to 256 (padded to a power of two >= 16 inside the
kernel with masks, so small and non-power-of-two head dims work without copies), strided inputs.
"""

from __future__ import annotations

import torch

from ..geometry import NAParams
from ..offsets import MAX_GRID_Y, heads_limit_reason

__all__ = ["na", "unavailable_reason", "unsupported_reason", "MAX_HEAD_DIM"]

# Bigger heads would not fit a tile's q/acc/dq blocks in registers.
MAX_HEAD_DIM = 256
# One program per (batch, head) on CUDA grid axis 1 (kernels/offsets.py).
MAX_HEADS = MAX_GRID_Y

try:
    from . import ops as _ops
    from ..triton_utils import interpreted as _interpreted
    _IMPORT_ERROR = None
except ImportError as exc:  # no triton on this machine
    _ops = None
    _IMPORT_ERROR = exc


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if _ops is None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        return "Triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"Triton kernels need a CUDA device, got {device.type}"


def unsupported_reason(query: torch.Tensor) -> str | None:
    """Why these kernels cannot take ``query``'s problem (``backend="auto"`` then moves on)."""
    if query.dtype == torch.float64:
        return "float64 is not supported (use float32, float16 or bfloat16, or backend='reference')"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim must be <= {MAX_HEAD_DIM}; got {query.shape[-1]}"
    # A big batch is launched in chunks (kernels/offsets.py); one batch element's heads must fit a launch.
    return heads_limit_reason(query.shape[-2])


def na(query, key, value, params: NAParams, rpb, scale: float, return_lse: bool):
    """Fused NA: ``out`` ``[B, *spatial, H, D]`` (and the float32 logsumexp ``[B, *spatial, H]``)."""
    if rpb is not None and rpb.dtype == torch.float64:
        raise TypeError(f"backend='fused': {unsupported_reason(rpb)}")
    reason = unsupported_reason(query)
    if reason is not None:
        raise (TypeError if query.dtype == torch.float64 else ValueError)(f"backend='fused': {reason}")
    out, lse = _ops.na_fused_fwd(query, key, value, rpb, list(params.kernel_size), list(params.dilation),
                                 list(params.is_causal), float(scale))
    return (out, lse) if return_lse else out
