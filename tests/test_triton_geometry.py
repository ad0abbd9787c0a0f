"""The @triton.jit window helpers equal kernels.geometry on every small case (interpreter on CPU)."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dinat.kernels import geometry  # noqa: E402
from dinat.kernels import triton_geometry as tg  # noqa: E402


@triton.jit
def _tables_kernel(out_ptr, length, dilation, KERNEL: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < length
    start = tg.window_start(i, length, KERNEL, dilation, CAUSAL)
    tl.store(out_ptr + i, start, mask=m)
    tl.store(out_ptr + BLOCK + i, tg.inverse_first(i, length, KERNEL, dilation, CAUSAL), mask=m)
    tl.store(out_ptr + 2 * BLOCK + i, tg.inverse_count(i, length, KERNEL, dilation, CAUSAL), mask=m)
    last = start + (KERNEL - 1) * dilation
    tl.store(out_ptr + 3 * BLOCK + i, tg.rpb_offset(i, last, KERNEL, dilation), mask=m)
    tl.store(out_ptr + 4 * BLOCK + i, tg.slot_valid(i, last, CAUSAL).to(tl.int32), mask=m)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_jit_helpers_match_tables(k, d, causal):
    for length in range(k * d, k * d + 2 * d + 3):
        block = triton.next_power_of_2(length)
        out = torch.full((5 * block,), -7, dtype=torch.int32, device=_device())
        _tables_kernel[(1,)](out, length, d, KERNEL=k, CAUSAL=causal, BLOCK=block)
        out = out.view(5, block)[:, :length].cpu().long()
        nb, valid, rel = geometry.axis_window(length, k, d, causal)
        tables = geometry.axis_tables(length, k, d, causal)
        assert out[0].tolist() == nb[:, 0].tolist()
        assert out[1].tolist() == tables.inverse_start.tolist()
        assert out[2].tolist() == tables.inverse_count.tolist()
        assert out[3].tolist() == rel[:, -1].tolist()
        assert out[4].bool().tolist() == valid[:, -1].tolist()
