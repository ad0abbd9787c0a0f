"""The unfused kernels compile for real NVIDIA GPUs, checked on a machine without one.

The interpreter accepts code that the GPU compiler rejects (e.g. dot shapes < 16), so this test
compiles every kernel ahead of time for sm_80 down to a cubin (Triton's bundled ptxas), in a
subprocess without TRITON_INTERPRET (the interpreter replaces ``triton.jit`` at import time).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ARCH = 80  # A100; the kernels use nothing newer


def compile_all(arch: int = ARCH) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from kernels.unfused import av_kernels, qk_kernels

    target = GPUTarget("cuda", arch, 32)

    def build(kernel, constexprs: dict, pointer_types: dict) -> None:
        fn = kernel
        while not isinstance(fn, JITFunction):  # unwrap the autotuner
            fn = fn.fn
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointer_types.get(name, "*fp16")
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=target)

    # One 2-D non-causal window with RPB and a multi-chunk head dim, one 3-D causal one.
    cases = [
        dict(K0=1, K1=7, K2=7, CAUSAL0=False, CAUSAL1=False, CAUSAL2=False, HEAD_DIM=96, BLOCK_D=64, BLOCK_N=64),
        dict(K0=3, K1=2, K2=3, CAUSAL0=True, CAUSAL1=False, CAUSAL2=True, HEAD_DIM=8, BLOCK_D=8, BLOCK_N=32),
    ]
    built = 0
    for case in cases:
        rpb = not case["CAUSAL0"]
        build(qk_kernels._window_dot_kernel, dict(case, HAS_RPB=rpb, FILL_NEG_INF=True),
              {"out_ptr": "*fp32", "rpb_ptr": "*fp32"})
        build(av_kernels._window_sum_kernel, case, {"w_ptr": "*fp32", "y_ptr": "*bf16", "out_ptr": "*bf16"})
        build(av_kernels._inverse_sum_kernel, case, {"w_ptr": "*fp32"})
        geometry = {k: v for k, v in case.items() if k[:-1] in ("K", "CAUSAL")}
        build(qk_kernels._rpb_grad_kernel, dict(geometry, BLOCK_M=64, BLOCK_R=64),
              {"g_ptr": "*fp32", "partial_ptr": "*fp32"})
        built += 4
    return built


def test_kernels_compile_to_cubin_for_sm80():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 8 kernels" in result.stdout


if __name__ == "__main__":
    print(f"compiled {compile_all()} kernels for sm_{ARCH}")
