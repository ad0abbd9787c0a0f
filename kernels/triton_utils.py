"""What both Triton kernel families (``kernels.fused``, ``kernels.unfused``) share at run time.

Host side: whether kernels run through Triton's CPU interpreter, whether a call launches Triton at
all, the op arguments as ``NAParams``, a problem padded to the three spatial axes every kernel is
written for (``Padded3``). Device side: named constants for ``@triton.jit`` code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .geometry import NAParams

# Base-2 softmax: exp(x) = exp2(x * LOG2E), log(x) = log2(x) * LN2. Module-level constexprs, so
# ``@triton.jit`` code reads them as compile-time constants.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ``triton.jit`` picks the interpreter when a kernel is defined, i.e. when the kernel packages (which
# import this module first) are imported.
_INTERPRETED_AT_IMPORT = _interpret_env()


def interpreted() -> bool:
    """Whether the kernels run through Triton's CPU interpreter: ``TRITON_INTERPRET=1`` was set when
    they were defined and still is (unset later, CPU calls fall back to plain PyTorch)."""
    return _INTERPRETED_AT_IMPORT and _interpret_env()


def use_triton(*tensors) -> bool:
    """Whether an op on ``tensors`` (the first one decides the device; ``None`` entries are skipped)
    launches Triton: always on CUDA; on CPU only through the interpreter and only for tensors with
    data (fake tensors, while ``torch.compile``/``opcheck`` trace, take the PyTorch path)."""
    device = tensors[0].device.type
    if device == "cuda":
        return True
    return device == "cpu" and interpreted() and not any(t is not None and is_fake(t) for t in tensors)


def na_params(kernel_size, dilation, is_causal) -> NAParams:
    """A custom op's list arguments as ``NAParams`` (plain ints and bools)."""
    return NAParams(tuple(int(k) for k in kernel_size), tuple(int(d) for d in dilation),
                    tuple(bool(c) for c in is_causal))



@dataclass(frozen=True)
class Padded3:
    """An NA problem padded to three spatial axes (padded axes first).

    Every kernel is written once for three spatial axes. A 1-D or 2-D problem runs as a 3-D one whose
    leading axes have length 1, kernel size 1, dilation 1 and stride 0: with ``k = 1`` the window rule
    of ``kernels.triton_geometry`` gives every such axis the single slot ``j = i = 0``, so the padded
    axes change neither the neighbour order (row-major, axis 0 slowest) nor the RPB index.
    """

    spatial: tuple[int, int, int]
    kernel_size: tuple[int, int, int]
    dilation: tuple[int, int, int]
    is_causal: tuple[bool, bool, bool]
    ndim: int  # the real number of spatial axes

    @classmethod
    def of(cls, spatial, params: NAParams) -> "Padded3":
        pad = 3 - len(spatial)
        return cls(spatial=(1,) * pad + tuple(int(s) for s in spatial),
                   kernel_size=(1,) * pad + tuple(int(k) for k in params.kernel_size),
                   dilation=(1,) * pad + tuple(int(d) for d in params.dilation),
                   is_causal=(False,) * pad + tuple(bool(c) for c in params.is_causal),
                   ndim=len(spatial))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def num_slots(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def rpb_bins(self) -> int:
        return math.prod(2 * k - 1 for k in self.kernel_size)

    def strides(self, x: torch.Tensor) -> tuple[int, ...]:
        """Strides ``(batch, axis0, axis1, axis2, *trailing)`` of a ``[B, *spatial, ...]`` tensor
        (``[B, *spatial, H, D]``: trailing ``(heads, last)``), 0 on the padded axes (their only index
        is 0). Any strides work, so views such as ``qkv.unbind(-3)`` and expanded gradients are read
        in place, without a copy."""
        s = x.stride()
        return (s[0], *((0,) * (3 - self.ndim)), *s[1:])

    def stride_args(self, **tensors: torch.Tensor) -> dict:
        """The ``strides`` of every ``name=tensor`` as the kernels' keyword arguments ``s<name>b,
        s<name>0, s<name>1, s<name>2, s<name>h, s<name>d`` (both families name strides this way;
        ``d`` is the last axis)."""
        return {f"s{name}{axis}": stride for name, x in tensors.items()
                for axis, stride in zip("b012hd", self.strides(x))}

    def shape_args(self) -> dict:
        """The geometry as the kernels' keyword arguments: ``L*`` sizes, ``D*`` dilations, ``K*`` kernel
        sizes, ``C*`` causality (axis 0 first)."""
        return {f"{letter}{axis}": value for letter, values in
                (("L", self.spatial), ("D", self.dilation), ("K", self.kernel_size), ("C", self.is_causal))
                for axis, value in enumerate(values)}
