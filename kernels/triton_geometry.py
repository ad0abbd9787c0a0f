"""The window rule of ``kernels.geometry``, as ``@triton.jit`` helpers for the kernels.

Same formulas, per axis, on token indices of the full axis (not sub-grid coordinates); they
work elementwise on blocks of indices. ``tests/test_triton_geometry.py`` checks them against
``geometry.axis_window`` / ``geometry.axis_tables`` on every small case.

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
def window_start(i, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr):
    """Token index of window slot 0 of query ``i``; slot ``t`` is ``start + t * dilation``."""
    group = i % dilation
    ip = i // dilation
    if CAUSAL:
        sp = tl.maximum(ip - (KERNEL - 1), 0)
    else:
        sp = tl.minimum(tl.maximum(ip - KERNEL // 2, 0), subgrid_length(i, length, dilation) - KERNEL)
    return sp * dilation + group


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
def inverse_first(j, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr):
    """First query (token index) whose window holds key ``j``."""
    group = j % dilation
    jp = j // dilation
    if CAUSAL:
        ip = jp
    else:
        ip = tl.where(jp - (KERNEL - 1) <= 0, 0, jp - (KERNEL - 1) + KERNEL // 2)
    return ip * dilation + group


@triton.jit
def inverse_count(j, length, KERNEL: tl.constexpr, dilation, CAUSAL: tl.constexpr):
    """Number of queries whose windows hold key ``j``: they are ``first + s * dilation``."""
    jp = j // dilation
    length_g = subgrid_length(j, length, dilation)
    if CAUSAL:
        last = tl.minimum(jp + KERNEL - 1, length_g - 1)
        first = jp
    else:
        last = tl.where(jp >= length_g - KERNEL, length_g - 1, jp + KERNEL // 2)
        first = tl.where(jp - (KERNEL - 1) <= 0, 0, jp - (KERNEL - 1) + KERNEL // 2)
    return last - first + 1


@triton.jit
def rpb_offset(i, j, KERNEL: tl.constexpr, dilation):
    """Relative-position-bias index of key ``j`` for query ``i`` (same group): ``j'-i'+k-1``."""
    return (j - i) // dilation + KERNEL - 1
