"""What both Triton kernel families (``kernels.fused``, ``kernels.unfused``) share at run time.

Host side: whether kernels run through Triton's CPU interpreter, whether a call launches Triton at
all, the op arguments as ``NAParams``. Device side: named constants for ``@triton.jit`` code.
"""

from __future__ import annotations

import os

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

