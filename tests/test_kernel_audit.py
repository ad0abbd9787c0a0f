"""The kernel audit (``benchmarks.kernel_audit``): its SASS reading, occupancy, loop finding, and quick mode.

Quick mode runs here on the installed Triton only (one kernel, one dilation: a cold compile is
seconds of CPU); ``make kernel-audit-quick`` adds the GPU image's Triton 3.6.0 from a side install.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from benchmarks import _audit_gpus, _audit_sass  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A made-up listing in cuobjdump's format: a prologue, a loop 0x0040..0x00c0 (backward branch),
# an exit, and the trailing self-branch + NOP padding that is not code.
SASS = """
\tcode for sm_90a
\t\tFunction : _toy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x0 */
        /*0010*/                   S2R R0, SR_TID.X ;                        /* 0x0 */
        /*0020*/                   IMAD R2, R0, 0x4, RZ ;                    /* 0x0 */
        /*0030*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;       /* 0x0 */
        /*0040*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ; /* 0x0 */
        /*0050*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;          /* 0x0 */
        /*0060*/                   LDG.E R7, desc[UR4][R8.64+0x4] ;          /* 0x0 */
        /*0070*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR8], RZ, !UPT ; /* 0x0 */
        /*0080*/                   MUFU.EX2 R9, R9 ;                         /* 0x0 */
        /*0090*/                   FFMA R10, R9, R9, R10 ;                   /* 0x0 */
        /*00a0*/                   IADD3 R2, R2, 0x40, RZ ;                  /* 0x0 */
        /*00b0*/                   ISETP.GE.AND P0, PT, R2, 0x100, PT ;      /* 0x0 */
        /*00c0*/               @!P0 BRA 0x40 ;                                /* 0x0 */
        /*00d0*/                   STG.E [R4.64], R10 ;                      /* 0x0 */
        /*00e0*/                   EXIT ;                                    /* 0x0 */
        /*00f0*/                   BRA 0xf0;                                 /* 0x0 */
        /*0100*/                   NOP;                                      /* 0x0 */
"""


def test_sass_loop_and_classes():
    analysis = _audit_sass.analyse(SASS)
    assert analysis["kernel"] == "_toy_kernel"
    assert analysis["instructions"] == 15  # padding after EXIT dropped
    assert analysis["all_loops"] == [("0x40", "0xc0")]  # the self-branch is no loop
    main = analysis["main_loop"]
    assert main["total"] == 9
    assert main["classes"] == dict(global_load=3, mma=1, mufu=1, fp32=1, integer=2, other=1)
    assert main["ldg_by_bits"] == {"16": 1, "32": 1}
    assert main["ldgsts_by_bits"] == {"128": 1}
    assert analysis["outside_main_loop"] == 6


def test_sass_innermost_of_nested_loops():
    assert _audit_sass.innermost([(0x10, 0x100), (0x40, 0x80), (0x90, 0xa0)]) == [(0x40, 0x80), (0x90, 0xa0)]


def test_occupancy_matches_the_register_file():
    h100 = _audit_gpus.GPUS["H100"]
    # 255 registers x 128 threads: 2 blocks (8 warps) per SM, register-limited.
    assert _audit_gpus.occupancy(h100, 255, 4, 40_000) == dict(blocks_per_sm=2, warps_per_sm=8,
                                                               limited_by="registers")
    # 200 KB of shared memory: one block.
    assert _audit_gpus.occupancy(h100, 64, 4, 200 * 1024)["blocks_per_sm"] == 1
    # Over the per-block limit: does not launch.
    assert _audit_gpus.occupancy(h100, 64, 4, 228 * 1024)["blocks_per_sm"] == 0


def test_every_gpu_figure_has_a_source():
    for gpu in _audit_gpus.GPUS.values():
        assert gpu.sources and gpu.sms == 132 and gpu.hbm_tbs_used > 0


def test_innermost_loops_of_a_jit_function():
    from benchmarks._audit_trips import innermost_loops, runtime_loops
    import triton.language as tl

    @triton.jit
    def toy(x_ptr, n, m, B: tl.constexpr):
        acc = tl.zeros([B], tl.float32)
        for i in range(0, n):
            for j in range(0, m, B):  # innermost
                acc += tl.load(x_ptr + j + tl.arange(0, B))
        for s in tl.static_range(2):  # unrolled: not a loop
            acc += 1
        tl.store(x_ptr + tl.arange(0, B), acc)

    loops = innermost_loops(toy)
    assert len(loops) == 1 and loops[0]["range"] == "range"
    source = Path(__file__).read_text().splitlines()
    assert source[loops[0]["line"] - 1].strip().startswith("for j in range(0, m, B)")
    outer, inner = runtime_loops(toy)
    assert inner["parent"] == outer["line"] and outer["parent"] is None and not outer["innermost"]


def test_main_source_loop_skips_single_trip_loops():
    from benchmarks.kernel_audit import main_source_loop

    outer = dict(line=10, innermost=False, parent=None, trips=[49, 49])
    inner = dict(line=12, innermost=True, parent=10, trips=[1] * 98)
    assert main_source_loop([outer, inner]) is outer
    inner["trips"] = []  # in a branch a constexpr removes
    assert main_source_loop([outer, inner]) is outer
    inner["trips"] = [1, 2]
    assert main_source_loop([outer, inner]) is inner
    assert main_source_loop([outer, inner, dict(inner, line=14)]) is None  # two innermost loops: not mapped


QUICK_LINE = re.compile(r"^fused_fwd_d1 sm_90 (\S+) (\d+) (\d+) (\d+) (\d+\.\d+)$")


def test_quick_mode_prints_one_parsable_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AUDIT_TRITON36_PYTHON")}
    env.update(PYTHONPATH=str(ROOT), KERNEL_AUDIT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "benchmarks.kernel_audit", "--quick", "--triton", "installed",
           "--kernels", "fused_fwd", "--dilations", "1"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("fused_")]
    assert len(lines) == 1, result.stdout
    match = QUICK_LINE.match(lines[0])
    assert match, lines[0]
    version, regs, spills, per_iter, ratio = match.groups()
    assert version == triton.__version__
    assert 32 <= int(regs) <= 255 and int(spills) >= 0
    assert int(per_iter) > 100  # the online-softmax loop body is hundreds of instructions
    assert float(ratio) > 0
    # A second run answers from the cache, with the same line.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and lines[0] in again.stdout


def test_trip_counter_counts_builtin_and_tl_range_loops():
    """The counting shim in a kernel module: outer loops run, innermost bodies are skipped."""
    import triton.language as tl

    from benchmarks._audit_trips import _CountingRange, _ranges_replaced

    loops = [dict(line=1, header=[1], innermost=False), dict(line=2, header=[2], innermost=True)]
    counter = _CountingRange(loops)
    module = {"tl": tl}
    code = compile("for i in range(3):\n    for j in tl.range(0, i + 5, 2, num_stages=2):\n        raise AssertionError\n",
                   "<kernel>", "exec")
    with _ranges_replaced(module, counter):
        assert module["tl"] is not tl and module["tl"].arange is tl.arange
        exec(code, module)
    assert module["tl"] is tl and "range" not in module
    assert counter.trips == {1: [3], 2: [3, 3, 4]}


def test_default_config_is_picked_among_the_candidates_the_autotuner_keeps():
    from benchmarks.kernel_audit import _default_config

    configs = [triton.Config({"BLOCK_K": b}, num_warps=w, num_stages=s)
               for b, w, s in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3))]

    class Launch:  # what _default_config reads of a recorded launch
        kernel = object()

        def __init__(self, kept):
            self.configs, self.candidates = configs, kept

    assert _default_config(Launch(configs), None) == (configs[1], "default")  # 64 keys, 4 warps, fewest stages
    assert _default_config(Launch(configs[2:]), None) == (configs[2], "default")  # (64, 4, 2) pruned
    assert _default_config(Launch([configs[0], configs[3]]), None) == (configs[0], "first candidate")
    assert _default_config(Launch([configs[3]]), None) == (configs[3], "only candidate")
