"""Public neighborhood-attention functions: argument checks, then dispatch to a backend.

Layout is heads-last: ``[batch, *spatial, heads, head_dim]``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from . import backends
from .geometry import NAParams, rpb_shape

__all__ = [
    "na1d", "na2d", "na3d",
    "na1d_qk", "na2d_qk", "na3d_qk",
    "na1d_av", "na2d_av", "na3d_av",
    "check_params",
]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _layout(ndim: int) -> str:
    return "[batch, " + ", ".join(_AXIS_NAMES[ndim]) + ", heads, head_dim]"


def _per_axis(name: str, value, ndim: int, kind: type) -> tuple:
    """Turn an int/bool or a per-axis sequence into a tuple of ``ndim`` values of ``kind``."""

    def ok(v):
        if kind is bool:
            return isinstance(v, bool)
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    what = "a bool" if kind is bool else "an int"
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(f"{name} must be {what} or a sequence of {ndim} (one per spatial axis); got {value!r}")
        if not all(ok(v) for v in value):
            raise TypeError(f"{name} must hold {what} per axis; got {value!r}")
        return tuple(kind(v) for v in value)
    if isinstance(value, torch.Tensor) or not ok(value):
        raise TypeError(f"{name} must be {what} or a sequence of {ndim}; got {value!r} ({type(value).__name__})")
    return (kind(value),) * ndim


def _check_tensor(name: str, x, ndim: int, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != ndim + 3:
        raise ValueError(
            f"{fn}: {name} must have rank {ndim + 3} {_layout(ndim)}; got rank {x.dim()} with shape {tuple(x.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be a floating tensor (float16, bfloat16, float32, float64); got {x.dtype}")


def _check_same(fn: str, ref_name: str, ref: torch.Tensor, name: str, x: torch.Tensor, shape=True) -> None:
    if shape and x.shape != ref.shape:
        raise ValueError(f"{fn}: {name} shape {tuple(x.shape)} must equal {ref_name} shape {tuple(ref.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} dtype {x.dtype} must equal {ref_name} dtype {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def check_params(spatial: Sequence[int], kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                 is_causal: BoolOrTuple = False, fn: str = "na") -> NAParams:
    """Validate per-axis parameters against a spatial shape and return them normalized."""
    ndim = len(spatial)
    ks = _per_axis("kernel_size", kernel_size, ndim, int)
    dil = _per_axis("dilation", dilation, ndim, int)
    causal = _per_axis("is_causal", is_causal, ndim, bool)
    names = _AXIS_NAMES[ndim]
    for axis, (size, k, d) in enumerate(zip(spatial, ks, dil)):
        where = f"axis {axis} ({names[axis]}, size {size})"
        if k < 2:
            raise ValueError(f"{fn}: kernel_size must be >= 2 on every axis; got {k} on {where}")
        if d < 1:
            raise ValueError(f"{fn}: dilation must be >= 1 on every axis; got {d} on {where}")
        if k * d > size:
            raise ValueError(
                f"{fn}: {where} is too small for kernel_size {k} with dilation {d}: "
                f"need kernel_size * dilation = {k * d} <= {size}"
            )
    return NAParams(ks, dil, causal)


def _check_rpb(fn: str, rpb, params: NAParams, heads: int, ref: torch.Tensor) -> None:
    if rpb is None:
        return
    if not isinstance(rpb, torch.Tensor):
        raise TypeError(f"{fn}: rpb must be a torch.Tensor or None; got {type(rpb).__name__}")
    if any(k % 2 == 0 for k in params.kernel_size):
        raise ValueError(f"{fn}: rpb needs an odd kernel_size on every axis; got kernel_size={params.kernel_size}")
    if params.any_causal:
        raise ValueError(f"{fn}: rpb is not defined for causal attention; got is_causal={params.is_causal}")
    expected = rpb_shape(heads, params.kernel_size)
    if tuple(rpb.shape) != expected:
        raise ValueError(f"{fn}: rpb must have shape [heads, 2*k-1 per axis] = {list(expected)}; got {list(rpb.shape)}")
    if rpb.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: rpb must be a floating tensor; got {rpb.dtype}")
    if rpb.device != ref.device:
        raise ValueError(f"{fn}: rpb is on {rpb.device} but query is on {ref.device}; put them on one device")


def _na(ndim, query, key, value, kernel_size, dilation, is_causal, rpb, scale, backend, return_lse):
    fn = f"na{ndim}d"
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, x, ndim, fn)
    _check_same(fn, "query", query, "key", key)
    _check_same(fn, "query", query, "value", value)
    params = check_params(query.shape[1:-2], kernel_size, dilation, is_causal, fn)
    _check_rpb(fn, rpb, params, query.shape[-2], query)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None; got {scale!r}")
    impl = backends.resolve(backend, query.device, "na", query)
    return impl.na(query, key, value, params, rpb, float(scale), bool(return_lse))


def _qk(ndim, query, key, kernel_size, dilation, is_causal, rpb, backend):
    fn = f"na{ndim}d_qk"
    _check_tensor("query", query, ndim, fn)
    _check_tensor("key", key, ndim, fn)
    _check_same(fn, "query", query, "key", key)
    params = check_params(query.shape[1:-2], kernel_size, dilation, is_causal, fn)
    _check_rpb(fn, rpb, params, query.shape[-2], query)
    return backends.resolve(backend, query.device, "qk", query).qk(query, key, params, rpb)


def _av(ndim, attn, value, kernel_size, dilation, is_causal, backend):
    fn = f"na{ndim}d_av"
    _check_tensor("value", value, ndim, fn)
    _check_tensor("attn", attn, ndim, fn)
    params = check_params(value.shape[1:-2], kernel_size, dilation, is_causal, fn)
    expected = (*value.shape[:-1], params.num_neighbors)
    if tuple(attn.shape) != expected:
        raise ValueError(
            f"{fn}: attn must have shape [batch, *spatial, heads, prod(kernel_size)] = {list(expected)}; "
            f"got {list(attn.shape)}"
        )
    _check_same(fn, "value", value, "attn", attn, shape=False)
    return backends.resolve(backend, value.device, "av", value).av(attn, value, params)


def na1d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[torch.Tensor] = None,
         scale: Optional[float] = None, backend: str = "auto", *,
         return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """1-D (dilated, causal) neighborhood attention with optional relative position bias.

    Args:
        query, key, value: [batch, length, heads, head_dim], one shape, dtype and device.
        kernel_size: window size, one int or one per axis (>= 2, ``kernel_size * dilation <= size``).
        dilation: gap between window neighbours, one int or one per axis (>= 1).
        is_causal: per axis, attend only to the query's own position and earlier ones.
        rpb: relative position bias [heads, 2*k-1], added to the scaled logits (odd kernel sizes,
            non-causal only).
        scale: logit scale; ``None`` means ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"tiled"``, ``"unfused"`` or ``"fused"``.
        return_lse: also return the float32 log-sum-exp of the logits, [batch, *spatial, heads].

    Returns:
        The output, [batch, length, heads, head_dim] (and the log-sum-exp with ``return_lse=True``).
    """
    return _na(1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, backend, return_lse)


def na1d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, rpb: Optional[torch.Tensor] = None, *,
            backend: str = "auto") -> torch.Tensor:
    """1-D neighborhood logits ``q . k (+ rpb)``, unscaled.

    Args:
        query, key: [batch, length, heads, head_dim], one shape, dtype and device.
        kernel_size, dilation, is_causal: as for ``na1d``.
        rpb: relative position bias [heads, 2*k-1] (odd kernel sizes, non-causal only).
        backend: as for ``na1d``.

    Returns:
        [batch, *spatial, heads, prod(kernel_size)], neighbours row-major over the window (axis 0
        slowest); unused causal slots are -inf.
    """
    return _qk(1, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na1d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, *, backend: str = "auto") -> torch.Tensor:
    """1-D neighborhood weighted sum of values.

    Args:
        attn: [batch, *spatial, heads, prod(kernel_size)] weights (as from ``na1d_qk`` after
            softmax), value's dtype and device; unused causal slots are ignored.
        value: [batch, length, heads, head_dim].
        kernel_size, dilation, is_causal: as for ``na1d``.
        backend: as for ``na1d``.

    Returns:
        [batch, length, heads, head_dim].
    """
    return _av(1, attn, value, kernel_size, dilation, is_causal, backend)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[torch.Tensor] = None,
         scale: Optional[float] = None, backend: str = "auto", *,
         return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """2-D (dilated, causal) neighborhood attention with optional relative position bias.

    Args:
        query, key, value: [batch, height, width, heads, head_dim], one shape, dtype and device.
        kernel_size: window size, one int or one per axis (>= 2, ``kernel_size * dilation <= size``).
        dilation: gap between window neighbours, one int or one per axis (>= 1).
        is_causal: per axis, attend only to the query's own position and earlier ones.
        rpb: relative position bias [heads, 2*k-1, 2*k-1], added to the scaled logits (odd kernel sizes,
            non-causal only).
        scale: logit scale; ``None`` means ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"tiled"``, ``"unfused"`` or ``"fused"``.
        return_lse: also return the float32 log-sum-exp of the logits, [batch, *spatial, heads].

    Returns:
        The output, [batch, height, width, heads, head_dim] (and the log-sum-exp with ``return_lse=True``).
    """
    return _na(2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, backend, return_lse)


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, rpb: Optional[torch.Tensor] = None, *,
            backend: str = "auto") -> torch.Tensor:
    """2-D neighborhood logits ``q . k (+ rpb)``, unscaled.

    Args:
        query, key: [batch, height, width, heads, head_dim], one shape, dtype and device.
        kernel_size, dilation, is_causal: as for ``na2d``.
        rpb: relative position bias [heads, 2*k-1, 2*k-1] (odd kernel sizes, non-causal only).
        backend: as for ``na2d``.

    Returns:
        [batch, *spatial, heads, prod(kernel_size)], neighbours row-major over the window (axis 0
        slowest); unused causal slots are -inf.
    """
    return _qk(2, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, *, backend: str = "auto") -> torch.Tensor:
    """2-D neighborhood weighted sum of values.

    Args:
        attn: [batch, *spatial, heads, prod(kernel_size)] weights (as from ``na2d_qk`` after
            softmax), value's dtype and device; unused causal slots are ignored.
        value: [batch, height, width, heads, head_dim].
        kernel_size, dilation, is_causal: as for ``na2d``.
        backend: as for ``na2d``.

    Returns:
        [batch, height, width, heads, head_dim].
    """
    return _av(2, attn, value, kernel_size, dilation, is_causal, backend)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[torch.Tensor] = None,
         scale: Optional[float] = None, backend: str = "auto", *,
         return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """3-D (dilated, causal) neighborhood attention with optional relative position bias.

    Args:
        query, key, value: [batch, depth, height, width, heads, head_dim], one shape, dtype and device.
        kernel_size: window size, one int or one per axis (>= 2, ``kernel_size * dilation <= size``).
        dilation: gap between window neighbours, one int or one per axis (>= 1).
        is_causal: per axis, attend only to the query's own position and earlier ones.
        rpb: relative position bias [heads, 2*k-1, 2*k-1, 2*k-1], added to the scaled logits (odd kernel sizes,
            non-causal only).
        scale: logit scale; ``None`` means ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"tiled"``, ``"unfused"`` or ``"fused"``.
        return_lse: also return the float32 log-sum-exp of the logits, [batch, *spatial, heads].

    Returns:
        The output, [batch, depth, height, width, heads, head_dim] (and the log-sum-exp with ``return_lse=True``).
    """
    return _na(3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, backend, return_lse)


def na3d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, rpb: Optional[torch.Tensor] = None, *,
            backend: str = "auto") -> torch.Tensor:
    """3-D neighborhood logits ``q . k (+ rpb)``, unscaled.

    Args:
        query, key: [batch, depth, height, width, heads, head_dim], one shape, dtype and device.
        kernel_size, dilation, is_causal: as for ``na3d``.
        rpb: relative position bias [heads, 2*k-1, 2*k-1, 2*k-1] (odd kernel sizes, non-causal only).
        backend: as for ``na3d``.

    Returns:
        [batch, *spatial, heads, prod(kernel_size)], neighbours row-major over the window (axis 0
        slowest); unused causal slots are -inf.
    """
    return _qk(3, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na3d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, *, backend: str = "auto") -> torch.Tensor:
    """3-D neighborhood weighted sum of values.

    Args:
        attn: [batch, *spatial, heads, prod(kernel_size)] weights (as from ``na3d_qk`` after
            softmax), value's dtype and device; unused causal slots are ignored.
        value: [batch, depth, height, width, heads, head_dim].
        kernel_size, dilation, is_causal: as for ``na3d``.
        backend: as for ``na3d``.

    Returns:
        [batch, depth, height, width, heads, head_dim].
    """
    return _av(3, attn, value, kernel_size, dilation, is_causal, backend)
