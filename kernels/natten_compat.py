"""NATTEN 0.17.4's functional API and context functions, computed by our backends.

Code written for NATTEN <= 0.17 (Hugging Face DiNAT/NAT, k-diffusion's HDiT, the NAT repo's
backbones, ...) calls these names with NATTEN's argument orders and tensor layouts; this module
accepts exactly those and forwards to ``kernels.api``. ``models.natten_compat.install()`` serves
it as ``natten.functional`` / ``natten.context`` (the ``nn.Module`` classes live in ``models``,
as ``kernels`` holds no ``torch.nn`` code).

Layouts (as in NATTEN 0.17.4):

* ``na{1,2,3}d_qk`` / ``na{1,2,3}d_av`` and the legacy ``natten{1,2,3}d{qkrpb,qk,av}`` are
  heads-first: ``query``/``key``/``value`` ``[batch, heads, *spatial, head_dim]``, attention
  weights ``[batch, heads, *spatial, prod(kernel_size)]``. ``qk`` returns ``q . k + rpb``
  unscaled (callers scale ``query`` first); its last axis lists the window row-major, axis 0
  slowest, the order NATTEN's kernels write (``ki`` outer, ``kj`` inner, key ``start + t * dilation``).
* the fused ``na{1,2,3}d`` is heads-last, ``[batch, *spatial, heads, head_dim]`` -- our own layout.

The checks NATTEN 0.17.4 made (in Python and in its C++ ``TORCH_CHECK``s) are made here before
any kernel runs: an odd ``kernel_size > 1``, ``dilation >= 1``, every axis at least
``kernel_size * dilation`` long, rank and shapes, no relative position bias with causal masking.
Argument errors are :class:`NattenArgumentError`, a ``ValueError`` that is also a
``RuntimeError`` (the type NATTEN's C++ checks raised), so existing ``except`` clauses still work.

Where 0.17.4 was limited, this layer goes further: every op runs on CPU and GPU in
float16/bfloat16/float32/float64, the fused op trains with ``rpb``, and the fused op's extra
keys/values need no xFormers (they go through the unfused ops, sharing one softmax). Where 0.17.4
silently ignored an argument it is an error here: ``additional_keys`` without
``additional_values`` (or the reverse) in the fused op. Nested tensors are not supported (a clear
``NotImplementedError``).
"""

from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import api, backends
from .api import BoolOrTuple, IntOrTuple

__all__ = [
    # 0.17 ops
    "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av", "na1d", "na2d", "na3d",
    # ops deprecated in 0.17 (removed in 0.17.5)
    "natten1dqkrpb", "natten2dqkrpb", "natten3dqkrpb", "natten1dqk", "natten2dqk", "natten3dqk",
    "natten1dav", "natten2dav", "natten3dav",
    # 0.15 names of the biased QK op
    "na1d_qk_with_bias", "na2d_qk_with_bias", "na3d_qk_with_bias",
    "NattenArgumentError", "use_backend", "get_backend",
    "FUNCTIONAL_NAMES", "CONTEXT_NAMES",
]


class NattenArgumentError(ValueError, RuntimeError):
    """An argument NATTEN 0.17.4 rejected. A ValueError; also a RuntimeError, as NATTEN's C++ checks raised."""


# ---------------------------------------------------------------------------------------------
# Which of our backends the compat ops use.
# ---------------------------------------------------------------------------------------------

_BACKEND = "auto"


def use_backend(name: str = "auto") -> None:
    """Backend of every compat op: "auto" (default), "reference", "unfused" or "fused" (see ``kernels.backends``)."""
    global _BACKEND
    if name != "auto" and name not in backends.BACKENDS:
        raise ValueError(f"use_backend: name must be 'auto' or one of {list(backends.BACKENDS)}; got {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


# ---------------------------------------------------------------------------------------------
# Argument checks, with NATTEN 0.17.4's rules.
# ---------------------------------------------------------------------------------------------

_AXES = {1: "[length]", 2: "[height, width]", 3: "[depth, height, width]"}
# Our heads-last ops by rank.
API_NA = {1: api.na1d, 2: api.na2d, 3: api.na3d}
API_QK = {1: api.na1d_qk, 2: api.na2d_qk, 3: api.na3d_qk}
API_AV = {1: api.na1d_av, 2: api.na2d_av, 3: api.na3d_av}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _per_axis(fn: str, name: str, value, ndim: int, default, ok, what: str) -> tuple:
    if value is None and default is not None:
        return (default,) * ndim
    if isinstance(value, (tuple, list)) and len(value) == ndim and all(ok(v) for v in value):
        return tuple(value)
    if ok(value):
        return (value,) * ndim
    raise NattenArgumentError(f"{fn}: {name} must be {what} or a tuple of {ndim} of them; got {value!r}")


def _params(fn: str, ndim: int, kernel_size, dilation, is_causal) -> tuple[tuple, tuple, tuple]:
    ks = _per_axis(fn, "kernel_size", kernel_size, ndim, None, _is_int, "an int")
    dil = _per_axis(fn, "dilation", dilation, ndim, 1, _is_int, "an int")
    causal = _per_axis(fn, "is_causal", is_causal, ndim, False, lambda v: isinstance(v, bool), "a bool")
    for k, d in zip(ks, dil):
        if k <= 1 or k % 2 == 0:
            raise NattenArgumentError(f"{fn}: kernel_size must be an odd number greater than 1 on every axis "
                                      f"(NATTEN <= 0.17); got {ks}")
        if d < 1:
            raise NattenArgumentError(f"{fn}: dilation must be >= 1 on every axis; got {dil}")
    return tuple(int(k) for k in ks), tuple(int(d) for d in dil), causal


def _check_rank(fn: str, name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if x.is_nested:
        raise NotImplementedError(f"{fn}: nested tensors are not supported by this NATTEN compatibility layer")
    if x.dim() != ndim + 3:
        raise NattenArgumentError(f"{fn}: {name} must be a rank-{ndim + 3} tensor {layout}; got shape "
                                  f"{tuple(x.shape)}")


def _check_fits(fn: str, spatial: Sequence[int], ks: tuple, dil: tuple) -> None:
    for axis, (size, k, d) in enumerate(zip(spatial, ks, dil)):
        if k * d > size:
            raise NattenArgumentError(
                f"{fn}: every spatial axis must be at least kernel_size * dilation long (NATTEN <= 0.17 does not "
                f"pad); axis {axis} has {size} < {k} * {d} = {k * d}")


def _check_causal_rpb(fn: str, causal: tuple, rpb) -> None:
    if rpb is not None and any(causal):
        raise NotImplementedError(f"{fn}: relative positional biases are not defined for causal neighborhood "
                                  f"attention (NATTEN 0.17 did not implement them either)")


def _heads_first(ndim: int) -> str:
    return f"[batch, heads, {_AXES[ndim][1:-1]}, head_dim]"


def _heads_last(ndim: int) -> str:
    return f"[batch, {_AXES[ndim][1:-1]}, heads, head_dim]"


def _to_last(x: Tensor) -> Tensor:
    """[B, heads, *spatial, C] -> [B, *spatial, heads, C] (a view)."""
    return x.movedim(1, -2)


def _to_first(x: Tensor) -> Tensor:
    """[B, *spatial, heads, C] -> contiguous [B, heads, *spatial, C], as NATTEN returned (callers ``.view`` it)."""
    return x.movedim(-2, 1).contiguous()


def _check_extra_tokens(fn: str, name: str, extra: Tensor, ref: Tensor) -> int:
    """Extra keys/values of the unfused ops: [batch, heads, tokens, head_dim] matching ``ref`` (heads-first)."""
    if not isinstance(extra, Tensor) or extra.dim() != 4:
        got = tuple(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__
        raise NattenArgumentError(f"{fn}: {name} must be a rank-4 tensor [batch, heads, tokens, head_dim]; got {got}")
    if extra.shape[0] != ref.shape[0] or extra.shape[1] != ref.shape[1] or extra.shape[-1] != ref.shape[-1]:
        raise NattenArgumentError(f"{fn}: {name} {tuple(extra.shape)} must match batch, heads and head_dim of "
                                  f"{tuple(ref.shape)}")
    return extra.shape[2]


# ---------------------------------------------------------------------------------------------
# 0.17 ops.
# ---------------------------------------------------------------------------------------------


def _qk(ndim, query, key, kernel_size, dilation, additional_keys, is_causal, rpb, fn):
    layout = _heads_first(ndim)
    _check_rank(fn, "query", query, ndim, layout)
    _check_rank(fn, "key", key, ndim, layout)
    ks, dil, causal = _params(fn, ndim, kernel_size, dilation, is_causal)
    if query.shape != key.shape:
        raise NattenArgumentError(f"{fn}: query {tuple(query.shape)} and key {tuple(key.shape)} must have one shape")
    _check_fits(fn, query.shape[2:-1], ks, dil)
    _check_causal_rpb(fn, causal, rpb)
    if rpb is not None and isinstance(rpb, Tensor):
        rpb = rpb.to(key.dtype)  # as NATTEN did
    attn = API_QK[ndim](_to_last(query), _to_last(key), ks, dil, causal, rpb, backend=_BACKEND)
    attn = _to_first(attn)
    if additional_keys is None:
        return attn
    _check_extra_tokens(fn, "additional_keys", additional_keys, query)
    extra = (query.flatten(2, -2) @ additional_keys.to(query.dtype).transpose(-1, -2))  # [B, heads, N, T]
    return torch.cat([attn, extra.reshape(*query.shape[:-1], -1)], dim=-1)


def _av(ndim, attn, value, kernel_size, dilation, additional_values, is_causal, fn):
    layout = _heads_first(ndim)
    _check_rank(fn, "value", value, ndim, layout)
    _check_rank(fn, "attn", attn, ndim, f"[batch, heads, {_AXES[ndim][1:-1]}, prod(kernel_size)]")
    ks, dil, causal = _params(fn, ndim, kernel_size, dilation, is_causal)
    _check_fits(fn, value.shape[2:-1], ks, dil)
    window = math.prod(ks)
    extra = 0 if additional_values is None else _check_extra_tokens(fn, "additional_values", additional_values, value)
    if attn.shape[:-1] != value.shape[:-1] or attn.shape[-1] != window + extra:
        raise NattenArgumentError(
            f"{fn}: attn must have shape {[*value.shape[:-1], window + extra]} (value's [batch, heads, *spatial] "
            f"and prod(kernel_size) = {window}" + (f" + {extra} additional tokens" if extra else "")
            + f" weights); got {list(attn.shape)}")
    attn = attn.to(value.dtype)  # as NATTEN did
    out = API_AV[ndim](_to_last(attn[..., :window]), _to_last(value), ks, dil, causal, backend=_BACKEND)
    out = _to_first(out)
    if extra:
        weights = attn[..., window:].flatten(2, -2)  # [B, heads, N, T]
        out = out + (weights @ additional_values.to(value.dtype)).reshape(value.shape)
    return out


def _fused(ndim, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
           additional_values, xformers_kwargs, fn):
    layout = _heads_last(ndim)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(fn, name, x, ndim, layout)
    ks, dil, causal = _params(fn, ndim, kernel_size, dilation, is_causal)
    if not (query.shape == key.shape == value.shape):
        raise NattenArgumentError(f"{fn}: query, key and value must have one shape; got {tuple(query.shape)}, "
                                  f"{tuple(key.shape)}, {tuple(value.shape)}")
    _check_fits(fn, query.shape[1:-2], ks, dil)
    _check_causal_rpb(fn, causal, rpb)
    # NATTEN 0.17.4 wrote `scale or head_dim ** -0.5`: a scale of 0 (or None) meant the default.
    scale = scale or query.shape[-1] ** -0.5
    if (additional_keys is None) != (additional_values is None):
        raise NattenArgumentError(f"{fn}: additional_keys and additional_values must be given together")
    if additional_keys is None:
        return API_NA[ndim](query, key, value, ks, dil, causal, rpb, scale, backend=_BACKEND)
    unknown = sorted(set(xformers_kwargs or {}) - {"scale"})
    if unknown:
        raise NotImplementedError(f"{fn}: xformers_kwargs {unknown} have no meaning here (no xFormers is used)")
    scale = (xformers_kwargs or {}).get("scale", scale)
    # Window logits and extra-token logits share one softmax, as merging two attentions does;
    # the unfused ops keep it differentiable in every input.
    batch, heads, dim = query.shape[0], query.shape[-2], query.shape[-1]
    extra_k = additional_keys.reshape(batch, -1, heads, dim).to(query.dtype)
    extra_v = additional_values.reshape(batch, -1, heads, value.shape[-1]).to(value.dtype)
    if extra_k.shape[1] != extra_v.shape[1]:
        raise NattenArgumentError(f"{fn}: additional_keys and additional_values hold different token counts "
                                  f"({extra_k.shape[1]} and {extra_v.shape[1]})")
    q = query * scale
    logits = API_QK[ndim](q, key, ks, dil, causal, rpb, backend=_BACKEND)  # [B, *spatial, heads, K]
    extra = torch.einsum("b...hd,bthd->b...ht", q, extra_k)
    attn = torch.cat([logits, extra], dim=-1).softmax(dim=-1)
    window = math.prod(ks)
    out = API_AV[ndim](attn[..., :window].contiguous(), value, ks, dil, causal, backend=_BACKEND)
    return out + torch.einsum("b...ht,bthd->b...hd", attn[..., window:], extra_v)


# NATTEN 0.17.4's three ``na{1,2,3}d*`` ops per rank, with its signatures (keyword names and order).


def na1d_qk(query: Tensor, key: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            additional_keys: Optional[Tensor] = None, is_causal: Optional[BoolOrTuple] = False,
            rpb: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.17.4's ``na1d_qk``: ``q . k (+ rpb)`` over 1-D windows, unscaled.

    Args:
        query, key: heads-first [batch, heads, length, head_dim].
        kernel_size, dilation, is_causal: one value or one per axis.
        additional_keys: optional [batch, heads, tokens, head_dim] keys every query also sees.
        rpb: optional relative position bias [heads, 2*k-1] (not with causal axes).

    Returns:
        [batch, heads, length, prod(kernel_size) (+ additional tokens)].
    """
    return _qk(1, query, key, kernel_size, dilation, additional_keys, is_causal, rpb, "na1d_qk")


def na1d_av(attn: Tensor, value: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            additional_values: Optional[Tensor] = None, is_causal: Optional[BoolOrTuple] = False) -> Tensor:
    """NATTEN 0.17.4's ``na1d_av``: window-weighted sum of values.

    Args:
        attn: [batch, heads, length, prod(kernel_size) (+ additional tokens)].
        value: heads-first [batch, heads, length, head_dim].
        kernel_size, dilation, is_causal: as for ``na1d_qk``.
        additional_values: optional [batch, heads, tokens, head_dim], weighted by attn's last columns.

    Returns:
        heads-first [batch, heads, length, head_dim].
    """
    return _av(1, attn, value, kernel_size, dilation, additional_values, is_causal, "na1d_av")


def na1d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
         is_causal: Optional[BoolOrTuple] = False, rpb: Optional[Tensor] = None, scale: Optional[float] = None,
         additional_keys: Optional[Tensor] = None, additional_values: Optional[Tensor] = None,
         xformers_kwargs: Optional[dict] = None) -> Tensor:
    """NATTEN 0.17.4's fused ``na1d``: 1-D neighborhood attention.

    Args:
        query, key, value: heads-last [batch, length, heads, head_dim].
        kernel_size, dilation, is_causal: one value or one per axis.
        rpb: optional relative position bias (not with causal axes).
        scale: logit scale; ``None`` or 0 means ``head_dim ** -0.5`` (as NATTEN).
        additional_keys, additional_values: optional extra tokens every query also attends to,
            sharing the window's softmax; given together.
        xformers_kwargs: only ``scale`` is understood (it applies to the additional tokens' path).

    Returns:
        heads-last [batch, length, heads, head_dim].
    """
    return _fused(1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs, "na1d")


def na2d_qk(query: Tensor, key: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            additional_keys: Optional[Tensor] = None, is_causal: Optional[BoolOrTuple] = False,
            rpb: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.17.4's ``na2d_qk``: ``q . k (+ rpb)`` over 2-D windows, unscaled.

    Args:
        query, key: heads-first [batch, heads, height, width, head_dim].
        kernel_size, dilation, is_causal: one value or one per axis.
        additional_keys: optional [batch, heads, tokens, head_dim] keys every query also sees.
        rpb: optional relative position bias [heads, 2*k-1, 2*k-1] (not with causal axes).

    Returns:
        [batch, heads, height, width, prod(kernel_size) (+ additional tokens)].
    """
    return _qk(2, query, key, kernel_size, dilation, additional_keys, is_causal, rpb, "na2d_qk")


def na2d_av(attn: Tensor, value: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            additional_values: Optional[Tensor] = None, is_causal: Optional[BoolOrTuple] = False) -> Tensor:
    """NATTEN 0.17.4's ``na2d_av``: window-weighted sum of values.

    Args:
        attn: [batch, heads, height, width, prod(kernel_size) (+ additional tokens)].
        value: heads-first [batch, heads, height, width, head_dim].
        kernel_size, dilation, is_causal: as for ``na2d_qk``.
        additional_values: optional [batch, heads, tokens, head_dim], weighted by attn's last columns.

    Returns:
        heads-first [batch, heads, height, width, head_dim].
    """
    return _av(2, attn, value, kernel_size, dilation, additional_values, is_causal, "na2d_av")


def na2d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
         is_causal: Optional[BoolOrTuple] = False, rpb: Optional[Tensor] = None, scale: Optional[float] = None,
         additional_keys: Optional[Tensor] = None, additional_values: Optional[Tensor] = None,
         xformers_kwargs: Optional[dict] = None) -> Tensor:
    """NATTEN 0.17.4's fused ``na2d``: 2-D neighborhood attention.

    Args:
        query, key, value: heads-last [batch, height, width, heads, head_dim].
        kernel_size, dilation, is_causal: one value or one per axis.
        rpb: optional relative position bias (not with causal axes).
        scale: logit scale; ``None`` or 0 means ``head_dim ** -0.5`` (as NATTEN).
        additional_keys, additional_values: optional extra tokens every query also attends to,
            sharing the window's softmax; given together.
        xformers_kwargs: only ``scale`` is understood (it applies to the additional tokens' path).

    Returns:
        heads-last [batch, height, width, heads, head_dim].
    """
    return _fused(2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs, "na2d")


def na3d_qk(query: Tensor, key: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            additional_keys: Optional[Tensor] = None, is_causal: Optional[BoolOrTuple] = False,
            rpb: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.17.4's ``na3d_qk``: ``q . k (+ rpb)`` over 3-D windows, unscaled.

    Args:
        query, key: heads-first [batch, heads, depth, height, width, head_dim].
        kernel_size, dilation, is_causal: one value or one per axis.
        additional_keys: optional [batch, heads, tokens, head_dim] keys every query also sees.
        rpb: optional relative position bias [heads, 2*k-1, 2*k-1, 2*k-1] (not with causal axes).

    Returns:
        [batch, heads, depth, height, width, prod(kernel_size) (+ additional tokens)].
    """
    return _qk(3, query, key, kernel_size, dilation, additional_keys, is_causal, rpb, "na3d_qk")


def na3d_av(attn: Tensor, value: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            additional_values: Optional[Tensor] = None, is_causal: Optional[BoolOrTuple] = False) -> Tensor:
    """NATTEN 0.17.4's ``na3d_av``: window-weighted sum of values.

    Args:
        attn: [batch, heads, depth, height, width, prod(kernel_size) (+ additional tokens)].
        value: heads-first [batch, heads, depth, height, width, head_dim].
        kernel_size, dilation, is_causal: as for ``na3d_qk``.
        additional_values: optional [batch, heads, tokens, head_dim], weighted by attn's last columns.

    Returns:
        heads-first [batch, heads, depth, height, width, head_dim].
    """
    return _av(3, attn, value, kernel_size, dilation, additional_values, is_causal, "na3d_av")


def na3d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
         is_causal: Optional[BoolOrTuple] = False, rpb: Optional[Tensor] = None, scale: Optional[float] = None,
         additional_keys: Optional[Tensor] = None, additional_values: Optional[Tensor] = None,
         xformers_kwargs: Optional[dict] = None) -> Tensor:
    """NATTEN 0.17.4's fused ``na3d``: 3-D neighborhood attention.

    Args:
        query, key, value: heads-last [batch, depth, height, width, heads, head_dim].
        kernel_size, dilation, is_causal: one value or one per axis.
        rpb: optional relative position bias (not with causal axes).
        scale: logit scale; ``None`` or 0 means ``head_dim ** -0.5`` (as NATTEN).
        additional_keys, additional_values: optional extra tokens every query also attends to,
            sharing the window's softmax; given together.
        xformers_kwargs: only ``scale`` is understood (it applies to the additional tokens' path).

    Returns:
        heads-last [batch, depth, height, width, heads, head_dim].
    """
    return _fused(3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs, "na3d")


# ---------------------------------------------------------------------------------------------
# Ops deprecated in 0.17 and removed in 0.17.5: one int kernel size and dilation (3-D: a separate
# one for depth), heads-first, never causal.
# ---------------------------------------------------------------------------------------------


def natten1dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int, dilation: int) -> Tensor:
    return _qk(1, query, key, (kernel_size,), (dilation,), None, False, rpb, "natten1dqkrpb")


def natten2dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int, dilation: int) -> Tensor:
    return _qk(2, query, key, (kernel_size,) * 2, (dilation,) * 2, None, False, rpb, "natten2dqkrpb")


def natten3dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                  dilation_d: int, dilation: int) -> Tensor:
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation), None,
               False, rpb, "natten3dqkrpb")


def natten1dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _qk(1, query, key, (kernel_size,), (dilation,), None, False, None, "natten1dqk")


def natten2dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _qk(2, query, key, (kernel_size,) * 2, (dilation,) * 2, None, False, None, "natten2dqk")


def natten3dqk(query: Tensor, key: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation), None,
               False, None, "natten3dqk")


def natten1dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _av(1, attn, value, (kernel_size,), (dilation,), None, False, "natten1dav")


def natten2dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _av(2, attn, value, (kernel_size,) * 2, (dilation,) * 2, None, False, "natten2dav")


def natten3dav(attn: Tensor, value: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    return _av(3, attn, value, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation), None,
               False, "natten3dav")


# NATTEN 0.14/0.15 spelled the biased QK op this way (same layout as the legacy ops).
def na1d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size: int, dilation: int,
                      additional_keys: Optional[Tensor] = None) -> Tensor:
    return _qk(1, query, key, (kernel_size,), (dilation,), additional_keys, False, bias, "na1d_qk_with_bias")


def na2d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size: int, dilation: int,
                      additional_keys: Optional[Tensor] = None) -> Tensor:
    return _qk(2, query, key, (kernel_size,) * 2, (dilation,) * 2, additional_keys, False, bias,
               "na2d_qk_with_bias")


def na3d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                      dilation_d: int, dilation: int, additional_keys: Optional[Tensor] = None) -> Tensor:
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation),
               additional_keys, False, bias, "na3d_qk_with_bias")


# ---------------------------------------------------------------------------------------------
# Context functions (``natten.*`` / ``natten.context``), answering for our backends.
# ---------------------------------------------------------------------------------------------


def has_cuda() -> bool:
    """A CUDA device is present and a Triton backend runs on it."""
    return torch.cuda.is_available() and "unfused" in backends.available_backends("cuda")


def has_fused_na(device_index=None) -> bool:
    """Our fused Triton kernel runs on the CUDA device (NATTEN: FNA kernels compiled for it)."""
    return torch.cuda.is_available() and "fused" in backends.available_backends("cuda")


has_fna = has_fused_na


def has_half(device_index=None) -> bool:
    return has_cuda()


def has_bfloat(device_index=None) -> bool:
    return has_cuda() and torch.cuda.is_bf16_supported()


def has_gemm(device_index=None) -> bool:
    """NATTEN's CUTLASS GEMM-based NA kernels: we have none (our kernels are Triton)."""
    return False


has_tf32_gemm = has_fp32_gemm = has_fp64_gemm = has_gemm


class MemoryUsagePreference(Enum):
    Default = 0
    Strict = 1
    Unrestricted = 2


class _Flags:
    """Settings code may toggle. Only ``fused`` changes what runs (the modules' fused path);
    the rest are kept and reported back because our kernels have no such knobs."""

    fused = False
    kv_parallel = False
    deterministic = False
    memory = MemoryUsagePreference.Default
    autotune_forward = autotune_backward = False
    thorough_forward = thorough_backward = False


def use_fused_na(mode: bool = True, kv_parallel: bool = True) -> None:
    """Make ``NeighborhoodAttention{1,2,3}D`` run the fused op (as NATTEN 0.17 did when enabled)."""
    _Flags.fused = bool(mode)
    _Flags.kv_parallel = bool(mode and kv_parallel and not _Flags.deterministic)


def is_fused_na_enabled() -> bool:
    return _Flags.fused


use_fna = use_fused_na
is_fna_enabled = is_fused_na_enabled


def use_kv_parallelism_in_fused_na(mode: bool = True) -> None:
    _Flags.kv_parallel = bool(mode) and not _Flags.deterministic


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return _Flags.kv_parallel


def use_deterministic_algorithms(mode: bool = True) -> None:
    _Flags.deterministic = bool(mode)


def are_deterministic_algorithms_enabled() -> bool:
    return _Flags.deterministic


def set_memory_usage_preference(pref: str = "default") -> None:
    prefs = {"default": MemoryUsagePreference.Default, "strict": MemoryUsagePreference.Strict,
             "unrestricted": MemoryUsagePreference.Unrestricted}
    if pref not in prefs:
        raise ValueError(f"set_memory_usage_preference: pref must be one of {list(prefs)}; got {pref!r}")
    _Flags.memory = prefs[pref]


def get_memory_usage_preference() -> MemoryUsagePreference:
    return _Flags.memory


def is_memory_usage_default() -> bool:
    return _Flags.memory is MemoryUsagePreference.Default


def is_memory_usage_strict() -> bool:
    return _Flags.memory is MemoryUsagePreference.Strict


def is_memory_usage_unrestricted() -> bool:
    return _Flags.memory is MemoryUsagePreference.Unrestricted


def use_autotuner(forward_pass: Optional[bool] = None, backward_pass: Optional[bool] = None,
                  thorough_mode_forward: Optional[bool] = None, thorough_mode_backward: Optional[bool] = None,
                  warmup_steps_forward: Optional[int] = None, warmup_steps_backward: Optional[int] = None,
                  steps_forward: Optional[int] = None, steps_backward: Optional[int] = None) -> None:
    """Recorded only: our kernels are tuned by ``kernels.tuning`` (see README), not per call."""
    for name, value in (("forward", forward_pass), ("backward", backward_pass)):
        if value is not None:
            setattr(_Flags, f"autotune_{name}", bool(value))
    for name, value in (("forward", thorough_mode_forward), ("backward", thorough_mode_backward)):
        if value is not None:
            setattr(_Flags, f"thorough_{name}", bool(value))


def disable_autotuner() -> None:
    _Flags.autotune_forward = _Flags.autotune_backward = False
    _Flags.thorough_forward = _Flags.thorough_backward = False


def is_autotuner_enabled() -> bool:
    return _Flags.autotune_forward or _Flags.autotune_backward


def is_autotuner_enabled_for_forward() -> bool:
    return _Flags.autotune_forward


def is_autotuner_enabled_for_backward() -> bool:
    return _Flags.autotune_backward


def is_autotuner_thorough_for_forward() -> bool:
    return _Flags.thorough_forward


def is_autotuner_thorough_for_backward() -> bool:
    return _Flags.thorough_backward


def _no_gemm_knob(mode: bool = True) -> None:
    """NATTEN's GEMM/tiled kernel switches: nothing to switch here (no such kernels), so a no-op."""


use_tf32_in_gemm_na = use_tiled_na = use_gemm_na = _no_gemm_knob


def _off() -> bool:
    return False


is_tf32_in_gemm_na_enabled = is_tiled_na_enabled = is_gemm_na_enabled = _off
enable_tf32 = disable_tf32 = enable_gemm_na = disable_gemm_na = enable_tiled_na = disable_tiled_na = _off


def reset_context() -> None:
    """Every setting back to its default (NATTEN's ``NattenContext.reset`` plus the autotuner's)."""
    for name, value in (("fused", False), ("kv_parallel", False), ("deterministic", False),
                        ("memory", MemoryUsagePreference.Default)):
        setattr(_Flags, name, value)
    disable_autotuner()


# What NATTEN 0.17.4 exported from ``natten.functional`` and from ``natten`` (context part).
FUNCTIONAL_NAMES = (
    "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av", "na1d", "na2d", "na3d",
    "natten1dqkrpb", "natten2dqkrpb", "natten3dqkrpb", "natten1dqk", "natten2dqk", "natten3dqk",
    "natten1dav", "natten2dav", "natten3dav", "na1d_qk_with_bias", "na2d_qk_with_bias", "na3d_qk_with_bias",
)
CONTEXT_NAMES = (
    "are_deterministic_algorithms_enabled", "disable_autotuner", "disable_gemm_na", "disable_tf32",
    "disable_tiled_na", "enable_gemm_na", "enable_tf32", "enable_tiled_na", "get_memory_usage_preference",
    "has_bfloat", "has_cuda", "has_fna", "has_fp32_gemm", "has_fp64_gemm", "has_fused_na", "has_gemm", "has_half",
    "has_tf32_gemm", "is_autotuner_enabled", "is_autotuner_enabled_for_backward", "is_autotuner_enabled_for_forward",
    "is_autotuner_thorough_for_backward", "is_autotuner_thorough_for_forward", "is_fna_enabled",
    "is_fused_na_enabled", "is_gemm_na_enabled", "is_kv_parallelism_in_fused_na_enabled", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "is_tf32_in_gemm_na_enabled", "is_tiled_na_enabled",
    "set_memory_usage_preference", "use_autotuner", "use_deterministic_algorithms", "use_fna", "use_fused_na",
    "use_gemm_na", "use_kv_parallelism_in_fused_na", "use_tf32_in_gemm_na", "use_tiled_na",
    "MemoryUsagePreference",
)
