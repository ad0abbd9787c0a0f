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
