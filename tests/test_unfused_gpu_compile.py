"""The unfused kernels (window dot, window sum, inverse sum, dRPB reduction) compile for sm_90 and
sm_80 exactly as a launch compiles them: launches recorded from the project's own host code
(forward and backward of ``kernels.na2d(backend="unfused")`` on fake CUDA tensors), bound by
Triton's own binder (see ``benchmarks/kernel_audit.py`` and ``tests/audit_compile.py``).
"""

import pytest

from tests.audit_compile import compile_rows, ptxas_available

triton = pytest.importorskip("triton")

STAGE3 = dict(spatial=[14, 14], heads=8, head_dim=32, kernel_size=[7, 7], causal=[False, False], rpb=True,
              batch=64, backend="unfused")
# (arch, dtype, dilation): every value of each factor once.
CASES = [(90, "bfloat16", 1), (80, "float16", 2)]
KERNELS = {"unfused_window_dot", "unfused_window_sum", "unfused_inverse_sum", "rpb_grad"}
# The dRPB reduction's inner loop adds one tile of logit-gradient rows (63 SASS on sm_90 with Triton
# 3.6.0 and 3.8.0 at DiNAT-tiny stage 1); a loop over twice that has regained per-element index work.
RPB_GRAD_MAX_SASS_PER_ITER = 128


@pytest.mark.skipif(not ptxas_available(), reason="this Triton build ships no NVIDIA backend/ptxas")
def test_unfused_kernels_compile_as_launched():
    rows = compile_rows(CASES, STAGE3)
    for (arch, dtype, dilation), case_rows in rows.items():
        names = {r["launch"].split("#")[0] for r in case_rows}
        assert names == KERNELS, (arch, dtype, dilation, names)
        for row in case_rows:
            where = f"{row['launch']} sm_{arch} {dtype} d{dilation}"
            assert row["compiled"], f"{where}: {row.get('error')}"
            assert row["registers"] and row["registers"] <= 255, where
            if row["launch"] == "rpb_grad":
                if arch == 90:  # ptxas -v runs on sm_90 only
                    assert row["spill_store_bytes"] == 0, where
                main_loop = row["sass"]["main_loop"]
                assert main_loop and main_loop["total"] <= RPB_GRAD_MAX_SASS_PER_ITER, (where, main_loop)
