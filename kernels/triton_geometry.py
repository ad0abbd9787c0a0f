"""The window rule of ``kernels.geometry``, as ``@triton.jit`` helpers for the kernels.

Same formulas, per axis, on token indices of the full axis; the ``subgrid_*`` helpers hold the
rule on sub-grid coordinates (what the fused kernels use: no division by the dilation) and the
token-index helpers are written with them. They work elementwise on blocks of indices.
``tests/test_triton_geometry.py`` checks them against ``geometry.axis_window`` /
``geometry.axis_tables`` on every small case.

The non-causal window start is written as a clamp, ``clamp(i' - k//2, 0, L_g - k)``, which equals
NATTEN's ``max(i' - wl, 0) + (i' + wr >= L_g) * (L_g - wr - i' - 1)`` whenever ``L_g >= k`` (always
true for valid inputs: ``k * d <= L``).
"""

import triton
import triton.language as tl


@triton.jit
def subgrid_length(i, length, dilation):
    """Tokens in query ``i``'s dilation group along an axis of ``length`` tokens."""
    return (length - i % dilation + dilation - 1) // dilation


@triton.jit
def subgrid_window_start(ip, length_g, KERNEL: tl.constexpr, CAUSAL: tl.constexpr):
    """Sub-grid coordinate of window slot 0 of sub-grid query ``ip`` (sub-grid of ``length_g``)."""
    if CAUSAL:
        sp = tl.maximum(ip - (KERNEL - 1), 0)
    else:
        sp = tl.minimum(tl.maximum(ip - KERNEL // 2, 0), length_g - KERNEL)
    return sp


@triton.jit
def window_start(i, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr):
    """Token index of window slot 0 of query ``i``; slot ``t`` is ``start + t * dilation``."""
    sp = subgrid_window_start(i // dilation, subgrid_length(i, length, dilation), KERNEL, CAUSAL)
    return sp * dilation + i % dilation


@triton.jit
def slot_valid(i, j, CAUSAL: tl.constexpr):
    """Whether the slot holding key ``j`` takes part in query ``i``'s window (same group)."""
    # Both branches return the broadcast shape of (i, j): the GPU compiler rejects a constexpr
    # branch whose results differ in shape (the interpreter does not).
    if CAUSAL:
        ok = j <= i
    else:
        ok = (j == j) & (i == i)
    return ok


@triton.jit
def subgrid_inverse_first(jp, KERNEL: tl.constexpr, CAUSAL: tl.constexpr):
    """Sub-grid coordinate of the first query whose window holds sub-grid key ``jp``."""
    if CAUSAL:
        ip = jp
    else:
        ip = tl.where(jp - (KERNEL - 1) <= 0, 0, jp - (KERNEL - 1) + KERNEL // 2)
    return ip


@triton.jit
def subgrid_inverse_last(jp, length_g, KERNEL: tl.constexpr, CAUSAL: tl.constexpr):
    """Sub-grid coordinate of the last query whose window holds sub-grid key ``jp``."""
    if CAUSAL:
        ip = tl.minimum(jp + KERNEL - 1, length_g - 1)
    else:
        ip = tl.where(jp >= length_g - KERNEL, length_g - 1, jp + KERNEL // 2)
    return ip


@triton.jit
def inverse_first(j, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr):
    """First query (token index) whose window holds key ``j``."""
    return subgrid_inverse_first(j // dilation, KERNEL, CAUSAL) * dilation + j % dilation


@triton.jit
def inverse_count(j, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr):
    """Number of queries whose windows hold key ``j``: they are ``first + s * dilation``."""
    jp = j // dilation
    last = subgrid_inverse_last(jp, subgrid_length(j, length, dilation), KERNEL, CAUSAL)
    return last - subgrid_inverse_first(jp, KERNEL, CAUSAL) + 1


@triton.jit
def rpb_offset(i, j, KERNEL: tl.constexpr, dilation):
    """Relative-position-bias index of key ``j`` for query ``i`` (same group): ``j'-i'+k-1``."""
    return (j - i) // dilation + KERNEL - 1


@triton.jit
def int64_strides(strides):
    """Every stride of the tuple ``strides`` as int64, in order: each offset built from them is then
    a 64-bit product. The prologue of a kernel's ``INT64_OFFSETS`` specialisation
    (``kernels/offsets.py``), one call for all its tensors; unit strides (Triton constexprs) work too.
    The loop is unrolled at trace time (one cast per stride, nothing at run time)."""
    cast = ()
    for i in tl.static_range(len(strides)):
        cast = cast + (tl.cast(strides[i], tl.int64),)
    return cast
