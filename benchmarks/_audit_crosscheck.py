"""Independent check of the audit: the fused forward at DiNAT-tiny stage 1 compiled another way.

Nothing of the audit's capture, binder or SASS reader is used. The arguments are written by hand
from ``kernels/fused/ops.py`` as of this commit (q, k, v views of one bf16 qkv projection
``[B, 56, 56, 3, 2, 32]``, a float32 RPB ``[2, 13, 13]``, contiguous out/lse; real CPU tensors,
so the binder sees real allocations), the kernel is compiled through Triton's *standard* launch
path -- ``JITFunction.warmup`` (``run(warmup=True)``) with a stub driver that names the target --
and the SASS is read with a few lines of regex written separately from ``_audit_sass``.
Registers come from ``cuobjdump -res-usage`` (the audit uses ``ptxas -v``).

This file copies today's argument list on purpose (that is what makes it independent); when the
kernel's signature changes it must be updated by hand, unlike the audit. Run:

    PYTHONPATH=. python -m benchmarks._audit_crosscheck [dilation]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402


class _StubDriver:
    """Enough of a Triton driver for ``warmup``: the target, a device and a stream, nothing to launch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise AttributeError(f"stub driver: {name} is not available without a GPU")


def compile_forward(dilation: int, arch: int = 90):
    from dinat.kernels.fused import forward

    B, H, W, heads, D, k = 64, 56, 56, 2, 32, 7
    qkv = torch.empty(B, H, W, 3, heads, D, dtype=torch.bfloat16)
    q, kk, v = qkv.unbind(3)
    rpb = torch.empty(heads, 2 * k - 1, 2 * k - 1, dtype=torch.float32)
    out = torch.empty(B, H, W, heads, D, dtype=torch.bfloat16)
    lse = torch.empty(B, H, W, heads, dtype=torch.float32)

    def strides(x):  # (batch, axis0 = padding, axis1, axis2, heads[, dim])
        s = x.stride()
        return (s[0], 0, *s[1:])

    tile_h = tile_w = 8 if dilation == 1 else 8  # config.tile_shape: 8x8 for 64 tokens of a 2-D map
    # Halo pitch per axis: the power of two holding the tile's halo (tile + k - 1 keys, at most the sub-grid).
    pitch = 1 << (min(tile_h + k - 1, -(-H // dilation)) - 1).bit_length()
    meta = dict(K0=1, K1=k, K2=k, C0=False, C1=False, C2=False, T0=1, T1=tile_h, T2=tile_w, P1=pitch, P2=pitch,
                HAS_RPB=True, BLOCK_D=D, IEEE=False, INT64_OFFSETS=False, BLOCK_K=64)
    args = (q, kk, v, rpb, out, lse, *strides(q), *strides(kk), *strides(v), *strides(out), *strides(lse),
            1, H, W, 1, dilation, dilation, heads, D, D ** -0.5)
    from triton.runtime import driver

    saved = driver._active
    driver.set_active(_StubDriver(arch))
    try:
        fn = forward.na_fwd_kernel.fn
        fn.device_caches.clear()
        compiled = fn.warmup(*args, grid=(1,), num_warps=4, num_stages=3, **meta)  # the forward's default config
    finally:
        driver._active = saved
    return compiled


def independent_sass_count(cubin: bytes) -> tuple[int, int]:
    """(registers, instructions in the longest backward-branch span) by plain regexes."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    addresses = [int(a, 16) for a in re.findall(r"/\*([0-9a-f]{4,5})\*/\s+\S", sass)]
    back = [(int(t, 16), int(a, 16)) for a, t in re.findall(r"/\*([0-9a-f]{4,5})\*/.*?BRA (0x[0-9a-f]+)", sass)
            if int(t, 16) < int(a, 16)]
    first, last = max(back, key=lambda span: span[1] - span[0])
    return registers, sum(1 for a in addresses if first <= a <= last)


def main(argv=None) -> int:
    dilations = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [1, 2]
    for d in dilations:
        compiled = compile_forward(d)
        regs, per_iter = independent_sass_count(compiled.asm["cubin"])
        print(f"crosscheck fused_fwd_d{d} sm_90 {triton.__version__} regs={regs} sass_per_iter={per_iter}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
