"""The fused kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter accepts programs a GPU compiler rejects (dots under 16, return-type mismatches of
constexpr branches, ...). Triton wheels ship ``ptxas``, so the whole pipeline down to a cubin runs
here; it needs ``TRITON_INTERPRET`` unset when triton is imported, hence a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# One specialisation that takes every code path: a causal axis, an RPB, an incoming dLSE,
# a 2-D tile, a non-power-of-two head (BLOCK_D 32 for head_dim 24).
META = dict(K0=1, K1=5, K2=7, C0=False, C1=False, C2=True, T0=1, T1=8, T2=8, P1=16, P2=16, HAS_RPB=True, BLOCK_D=32,
            IEEE=False)

_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.fused import backward, forward

meta = json.loads(sys.argv[1])
fp32_args = {"lse_ptr", "dlse_ptr", "delta_ptr", "drpb_ptr", "rpb_ptr"}

def compile_for_h100(kernel, constexprs):
    fn = kernel.fn  # the @triton.jit function under the autotuner
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_args else "*bf16"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    src = ASTSource(fn, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    assert compiled.asm["cubin"], fn.__name__
    print(fn.__name__, "shared", compiled.metadata.shared)

compile_for_h100(forward.na_fwd_kernel, dict(meta, BLOCK_K=64))
compile_for_h100(backward.na_bwd_dq_kernel, dict(meta, HAS_DLSE=True, BLOCK_S=64, BLOCK_R=128, BLOCK_K=64))
compile_for_h100(backward.na_bwd_dkdv_kernel, dict(meta, BLOCK_Q=64))
"""


def _ptxas_available() -> bool:
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this triton build ships no ptxas")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu-marked tests compile for the real device")
def test_kernels_compile_to_sm90_cubin():
    import json

    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(META)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("_na_fwd_kernel", "_na_bwd_dq_kernel", "_na_bwd_dkdv_kernel"):
        assert name in result.stdout
