"""Huge maps: 64-bit offsets inside a batch element only where a problem needs them (issue 17).

The launch-time decision is checked on shapes alone (meta tensors, fake CUDA tensors recorded by
the kernel audit's launch recorder: no memory is allocated), the 64-bit specialisation's results
on a small problem forced onto it (Triton interpreter), batch chunking past CUDA's grid limit with
the limit lowered, and -- on a GPU -- a real batch element of more than 2^31 elements.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinat import kernels
import dinat.kernels.unfused.rpb_kernels
from dinat.kernels import backends, fused, offsets, reference, tuning, unfused
from dinat.kernels.geometry import NAParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The video map: 64x256x256 tokens, 16 heads of 128 -> 2^33 elements per batch element.
VIDEO = dict(spatial=(64, 256, 256), heads=16, head_dim=128)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------------------------------------
# The host-side decision, from shapes and strides


def test_span_is_the_largest_offset_inside_a_batch_element():
    x = _meta(3, 64, 256, 256, 16, 128)
    assert offsets.element_span(x) == 64 * 256 * 256 * 16 * 128 - 1  # the batch axis does not count
    assert offsets.int64_offsets(x)
    assert not offsets.int64_offsets(_meta(64, 56, 56, 2, 32))  # DiNAT-tiny stage 1
    # Exactly at the int32 limit and one past it.
    assert not offsets.int64_offsets(_meta(2, 2**31, 1, 1))
    assert offsets.int64_offsets(_meta(2, 2**31 + 1, 1, 1))
    # Views: a q/k/v slice of a qkv projection spans the whole projection row; an expanded
    # tensor (stride 0) spans nothing along the expanded axis.
    qkv = torch.empty(1, 2**20, 3, 8, 128, device="meta")
    q = qkv.unbind(2)[0]
    assert offsets.element_span(q) == (2**20 - 1) * 3 * 8 * 128 + 7 * 128 + 127
    assert offsets.int64_offsets(q) and not offsets.int64_offsets(q.contiguous())
    expanded = torch.zeros(1, 1, 1, 1, 1).expand(1, 2**20, 2**12, 1, 1)
    assert offsets.element_span(expanded) == 0 and not offsets.int64_offsets(expanded)
    # Any one tensor decides; so does another index the kernel builds.
    assert offsets.int64_offsets(None, _meta(1, 4, 4), x) and not offsets.int64_offsets(None)
    assert offsets.int64_offsets(_meta(1, 4, 4), indices=offsets.INT32_MAX + 1)
    assert offsets.element_span(_meta(1, 0, 8)) == 0


def test_force_switch(monkeypatch):
    monkeypatch.setenv(offsets.FORCE_ENV, "1")
    assert offsets.int64_offsets(_meta(1, 4, 4))


def test_batch_chunks_fit_grid_axis_1():
    assert offsets.batch_chunks(64, 2, "fused") == [(0, 64)]
    chunks = offsets.batch_chunks(70000, 2, "fused")
    assert chunks[0] == (0, 32767) and chunks[-1][1] == 70000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((stop - start) * 2 <= offsets.MAX_GRID_Y for start, stop in chunks)
    assert offsets.batch_chunks(3, offsets.MAX_GRID_Y, "fused") == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="backend='unfused': heads must be <= 65535"):
        offsets.batch_chunks(1, offsets.MAX_GRID_Y + 1, "unfused")


# Launches recorded on fake CUDA tensors (the kernel audit's recorder: shapes and strides, no
# memory), in one subprocess without the interpreter (under it the ops are opaque on fake tensors).
_RECORD = """
import json, sys
from benchmarks._audit_launch import Problem, capture, launch_name
found = {}
for name, spec in json.loads(sys.stdin.read()).items():
    try:
        found[name] = [dict(kernel=launch_name(launch), int64=launch.kwargs.get("INT64_OFFSETS"),
                            grid_y=launch.grid_for({"BLOCK_N": 64})[1]) for launch in capture(Problem.from_json(spec))]
    except ValueError as exc:
        found[name] = str(exc)
print(json.dumps(found))
"""


def _problem(backend, spatial, heads, head_dim, batch, rpb, kernel=3):
    n = len(spatial)
    return dict(spatial=list(spatial), heads=heads, head_dim=head_dim, kernel_size=[kernel] * n, dilation=[1] * n,
                causal=[False] * n, rpb=rpb, batch=batch, backend=backend)


RECORDED = {
    # The unfused dRPB reduction has no 64-bit variant: no RPB on the unfused video map.
    **{f"{b}_video": _problem(b, batch=2, rpb=b == "fused", **VIDEO) for b in ("fused", "unfused")},
    **{f"{b}_stage1": _problem(b, (56, 56), 2, 32, batch=64, rpb=b == "fused") for b in ("fused", "unfused")},
    # Its input, the logits gradient, spans 16 heads x 5^3 slots per token here: past int32.
    "unfused_video_rpb": _problem("unfused", batch=1, rpb=True, kernel=5, **VIDEO),
    **{f"{b}_big_batch": _problem(b, (16,), 2, 16, batch=40000, rpb=False) for b in ("fused", "unfused")},
}


@pytest.fixture(scope="module")
def recorded():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                                                          os.environ.get("PYTHONPATH")])))
    env.pop(offsets.FORCE_ENV, None)
    result = subprocess.run([sys.executable, "-c", _RECORD], cwd=root, env=env, input=json.dumps(RECORDED),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("backend", ["fused", "unfused"])
def test_launches_take_the_64_bit_specialisation_only_when_needed(backend, recorded):
    """Every launch of a 2^33-element batch element is 64-bit, every launch of DiNAT-tiny's stage 1
    32-bit. (Before issue 17 the fused launches had no such flag: in-element offsets were int32
    products, wrong past 2^31.)"""
    huge, small = recorded[f"{backend}_video"], recorded[f"{backend}_stage1"]
    assert huge and all(launch["int64"] is True for launch in huge)
    assert small and all(launch["int64"] is False for launch in small if launch["kernel"] != "rpb_grad")
    assert [launch["grid_y"] for launch in huge] == [2 * 16] * len(huge)  # one launch per kernel


def test_unfused_drpb_reduction_refuses_what_it_cannot_index(recorded):
    """The unfused dRPB reduction is not 64-bit yet (issue 11, part R): a clear error, never a
    wrong gradient."""
    assert "dRPB reduction indexes within a batch element in int32" in recorded["unfused_video_rpb"]


def test_unfused_token_numbers_past_int32_are_refused():
    """The unfused row kernels number a batch element's tokens in int32 (meta tensors: no memory)."""
    from dinat.kernels.triton_utils import Padded3
    from dinat.kernels.unfused.qk_kernels import window_dot

    x = _meta(1, 2**31, 1, 1)
    geo = Padded3.of((2**31,), NAParams((3,), (1,), (False,)))
    with pytest.raises(ValueError, match="the row kernels number tokens in int32"):
        window_dot(x, x, None, geo, 1.0, True, _meta(1, 2**31, 1, 3))


@pytest.mark.parametrize("backend", ["fused", "unfused"])
def test_huge_batch_is_launched_in_chunks(backend, recorded):
    """batch * heads past CUDA's grid axis 1: consecutive launches over batch slices."""
    per_kernel = {}
    for launch in recorded[f"{backend}_big_batch"]:
        per_kernel.setdefault(launch["kernel"], []).append(launch["grid_y"])
    assert per_kernel
    for kernel, grid_y in per_kernel.items():
        # 40000 x 2 programs: 32767 + 7233 batch elements per launch (repeated for a kernel
        # launched twice, as the unfused backward does).
        assert grid_y == [65534, 14466] * (len(grid_y) // 2) and grid_y, (kernel, grid_y)


def test_too_many_heads_is_a_clear_error_and_auto_moves_on():
    q = torch.randn(1, 2, offsets.MAX_GRID_Y + 1, 1, device=DEVICE)
    for backend in ("fused", "unfused"):
        with pytest.raises(ValueError, match="heads must be <= 65535"):
            kernels.na1d(q, q, q, 2, backend=backend)
    meta = _meta(1, 2, offsets.MAX_GRID_Y + 1, 8)
    assert "grid axis 1" in fused.unsupported_reason(meta) and "grid axis 1" in unfused.unsupported_reason(meta)
    assert backends.resolve("auto", torch.device("cuda"), tensor=meta).__name__ == "dinat.kernels.tiled"
    ordinary = _meta(70000, 8, 2, 8)  # batch * heads past the grid limit: chunked, not skipped
    assert backends.resolve("auto", torch.device("cuda"), tensor=ordinary).__name__ == "dinat.kernels.fused"


# ---------------------------------------------------------------------------------------------
# Results (Triton interpreter on CPU, or the GPU)


def _launched_flags(monkeypatch) -> list:
    """The INT64_OFFSETS of every kernel launched from now on (the launches still run)."""
    seen = []
    original = tuning.run_kernel

    def run_kernel(kernel, grid, args, kwargs):
        seen.append(kwargs.get("INT64_OFFSETS"))
        original(kernel, grid, args, kwargs)

    monkeypatch.setattr(tuning, "run_kernel", run_kernel)
    for module in (kernels.unfused.rpb_kernels,):  # rpb_grad calls run_kernel directly
        monkeypatch.setattr(module, "run_kernel", run_kernel)
    return seen


def _check_against_reference(backend, batch, spatial, heads, kernel_size, dilation, rpb=True):
    gen = torch.Generator().manual_seed(17)
    shape = (batch, *spatial, heads, 8)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(3))
    bias = torch.randn(heads, *(2 * x - 1 for x in kernel_size), generator=gen).to(DEVICE).requires_grad_(rpb)
    na = {1: kernels.na1d, 2: kernels.na2d}[len(spatial)]
    out = na(q, k, v, kernel_size, dilation=dilation, rpb=bias if rpb else None, backend=backend)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    inputs = (q, k, v, bias) if rpb else (q, k, v)
    got = torch.autograd.grad(out, inputs, grad)
    params = NAParams(tuple(kernel_size), tuple(dilation), (False,) * len(spatial))
    want_out = reference.na(q, k, v, params, bias if rpb else None, 1 / math.sqrt(8))
    want = torch.autograd.grad(want_out, inputs, grad)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["fused", "unfused"])
def test_64_bit_specialisation_forced_on_a_small_problem(backend, monkeypatch):
    monkeypatch.setenv(offsets.FORCE_ENV, "1")
    flags = _launched_flags(monkeypatch)
    # The unfused dRPB reduction has no 64-bit variant: no RPB there.
    _check_against_reference(backend, 1, (6, 7), 2, (3, 3), (2, 1), rpb=backend == "fused")
    assert flags and all(flags)


@pytest.mark.parametrize("backend", ["fused", "unfused"])
def test_batch_chunks_give_the_same_results(backend, monkeypatch):
    """With the grid limit lowered to 2 programs, batch 3 x 1 head runs as 2 launches per kernel
    (the fused dRPB partials summed over them)."""
    monkeypatch.setattr(offsets, "MAX_GRID_Y", 2)
    flags = _launched_flags(monkeypatch)
    _check_against_reference(backend, 3, (9,), 1, (3,), (1,), rpb=backend == "fused")
    # Fused: forward, dQ, dK/dV; unfused: QK, AV, and two kernels in each op's backward.
    assert len(flags) == 2 * {"fused": 3, "unfused": 6}[backend] and not any(flags)


# ---------------------------------------------------------------------------------------------
# A real batch element of more than 2^31 elements (GPU only)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fused", "unfused"])
def test_batch_element_past_2_31_elements(backend):
    """2048x2048 tokens x 5 heads x 128 = 2.7e9 elements per tensor (5.4 GB in bf16): the map's
    bottom-right corner (the highest offsets) equals the same corner of a crop of the map
    (``benchmarks.gpu_record.check_past_int32``, also a line of the GPU record)."""
    from benchmarks.gpu_record import check_past_int32

    found = check_past_int32(backend, torch.device("cuda"))
    assert found["elements"] > offsets.INT32_MAX and found["ok"], found


def test_past_int32_check_itself_on_a_small_map(monkeypatch):
    """The GPU check's crop logic, on a small map forced onto the 64-bit kernels (float32: the
    interpreter has no bfloat16 arithmetic)."""
    from benchmarks.gpu_record import check_past_int32

    monkeypatch.setenv(offsets.FORCE_ENV, "1")
    found = check_past_int32("fused", torch.device(DEVICE), side=16, heads=1, head_dim=16, kernel=3, crop=12,
                             dtype_name="float32")
    assert found["ok"] and set(found["max_abs_err"]) == {"out", "dq"}, found
