"""The benchmark's alternatives compute what they claim, and the CPU smoke run works end to end."""

from __future__ import annotations

import datetime

import pytest
import torch

from dinat import kernels
from benchmarks import na_bench
from benchmarks._common import NAShape
from benchmarks.alternatives import FlexNA, flex_na, sdpa_full

from .strategies import Problem

NA_BY_RANK = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}

# (spatial, kernel_size, dilation, is_causal, use_rpb): every rank, per-axis dilation, even kernels,
# mixed causal axes, RPB. FlexAttention has no CPU backward in this torch, so forward only here.
FLEX_CASES = [
    ((23,), (5,), (3,), (False,), True),
    ((24,), (4,), (2,), (True,), False),
    ((9, 11), (3, 3), (2, 3), (False, False), True),
    ((8, 9), (3, 4), (2, 1), (True, False), False),
    ((4, 6, 7), (3, 3, 3), (1, 2, 2), (False, False, False), True),
    ((5, 6, 6), (3, 3, 2), (1, 1, 3), (True, False, False), False),
]


# float64 on every case (exact up to rounding), float32 (the benchmark's CPU dtype) on two.
FLEX_CASES_WITH_DTYPE = [(*case, torch.float64) for case in FLEX_CASES] + [
    (*FLEX_CASES[2], torch.float32), (*FLEX_CASES[5], torch.float32)]


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,use_rpb,dtype", FLEX_CASES_WITH_DTYPE)
def test_flex_na_matches_reference(spatial, kernel_size, dilation, is_causal, use_rpb, dtype):
    problem = Problem(2, spatial, 2, 8, kernel_size, dilation, is_causal, use_rpb)
    q, k, v, rpb = problem.tensors(dtype=dtype, seed=len(spatial))
    na = NA_BY_RANK[len(spatial)]
    expected = na(q, k, v, kernel_size, dilation, is_causal, rpb=rpb, scale=0.7, backend="reference")
    got = flex_na(q, k, v, kernel_size, dilation, is_causal, rpb=rpb, scale=0.7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_flex_na_reuses_block_mask_across_inputs_and_default_scale():
    problem = Problem(1, (10, 12), 3, 4, (5, 3), (2, 4), (False, False), True)
    flex = FlexNA(problem.spatial, problem.kernel_size, problem.dilation, problem.is_causal)
    for seed in (1, 2):
        q, k, v, rpb = problem.tensors(dtype=torch.float64, seed=seed)
        expected = kernels.na2d(q, k, v, (5, 3), (2, 4), rpb=rpb, backend="reference")
        torch.testing.assert_close(flex(q, k, v, rpb), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="spatial"):
        flex(*Problem(1, (10, 13), 3, 4, (5, 3), (2, 4), (False, False), False).tensors()[:3])


def test_flex_block_mask_skips_tiles_outside_the_windows():
    # 1600 tokens = 13 tiles of 128 per side: a 7x7 window touches few key tiles, dilation 5 many.
    undilated = FlexNA((40, 40), 7, 1).computed_block_fraction()
    dilated = FlexNA((40, 40), 7, 5).computed_block_fraction()
    assert 0 < undilated < 0.3 and undilated < dilated <= 1


def test_sdpa_full_is_dense_attention_in_na_layout():
    q, k, v, _ = Problem(2, (3, 4), 2, 8, (2, 2), (1, 1), (False, False), False).tensors(dtype=torch.float64)
    got = sdpa_full(q, k, v, 2, scale=0.5)
    flat = [x.reshape(2, 12, 2, 8) for x in (q, k, v)]
    weights = (torch.einsum("bnhd,bmhd->bhnm", flat[0], flat[1]) * 0.5).softmax(-1)
    expected = torch.einsum("bhnm,bmhd->bnhd", weights, flat[2]).reshape(q.shape)
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------------------------
# The benchmark tool


TINY_SMOKE_ARGS = ["--tiny", "--device", "cpu", "--candidates", "reference,flex,sdpa", "--repeats", "1"]


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header row


def test_tiny_preset_runs_end_to_end_and_writes_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.md", tmp_path / "bench.png"
    day_before = datetime.datetime.now(datetime.timezone.utc)
    results = na_bench.main([*TINY_SMOKE_ARGS, "--out", str(out), "--plot", str(png)])
    days = {f"- date: {day:%Y-%m-%d}" for day in (day_before, datetime.datetime.now(datetime.timezone.utc))}

    markdown = out.read_text()
    assert markdown in capsys.readouterr().out  # printed and written alike
    assert f"torch {torch.__version__}" in markdown and "triton " in markdown
    assert any(day in markdown for day in days)
    rows = _table_rows(markdown)
    shapes = na_bench.preset_shapes("tiny")
    assert len(rows) == len(results) == len(shapes) * 2 * 3  # shapes x (fwd, fwd+bwd) x candidates
    by_key = {(row[0], row[1], row[2]): row for row in rows}
    for shape in shapes:
        for mode in ("fwd", "fwd+bwd"):
            reference = by_key[(shape.bench_label, mode, "reference")]
            assert float(reference[3]) > 0 and reference[4] == "1.00x"  # the CPU baseline
            assert float(by_key[(shape.bench_label, mode, "sdpa")][3]) > 0
            assert by_key[(shape.bench_label, mode, "sdpa")][7] == "n/a (not NA)"
        assert float(by_key[(shape.bench_label, "fwd", "flex")][3]) > 0
        assert by_key[(shape.bench_label, "fwd+bwd", "flex")][3].startswith("unsupported")  # no CPU backward
    first = shapes[0].bench_label
    assert float(by_key[(first, "fwd", "flex")][7]) < 1e-4  # checked against the reference
    assert float(by_key[(first, "fwd+bwd", "reference")][7]) == 0.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_wrong_or_failing_candidate_is_reported_not_timed(monkeypatch, tmp_path):
    real_build = na_bench.build_candidate

    def build(name, shape, device, flex_compile):
        fn = real_build(name, shape, device, flex_compile)
        if name == "flex":  # a "kernel" that is fast and wrong
            return lambda q, k, v, rpb: fn(q, k, v, rpb) + 0.5
        if name == "sdpa" and len(shape.spatial) == 1:
            raise RuntimeError("simulated launch failure")
        return fn

    monkeypatch.setattr(na_bench, "build_candidate", build)
    out = tmp_path / "bench.md"
    na_bench.main([*TINY_SMOKE_ARGS, "--mode", "fwd", "--out", str(out)])
    rows = _table_rows(out.read_text())
    flex_rows = [row for row in rows if row[2] == "flex"]
    assert flex_rows[0][7].endswith("FAIL")
    assert all(row[3].startswith("wrong") and row[5] == "-" for row in flex_rows)
    label_1d = next(s.bench_label for s in na_bench.preset_shapes("tiny") if len(s.spatial) == 1)
    sdpa_1d = [row for row in rows if row[2] == "sdpa" and row[0] == label_1d]
    assert sdpa_1d and sdpa_1d[0][3].startswith("error")
    assert "simulated launch failure" in out.read_text()
    assert all(float(row[3]) > 0 for row in rows if row[2] == "reference")  # the others still ran


def test_presets_hold_the_documented_shapes():
    dinat = na_bench.preset_shapes("dinat-tiny")
    assert {(s.spatial, s.heads, s.dilation[0]) for s in dinat} == {
        ((56, 56), 2, 8), ((56, 56), 2, 1), ((28, 28), 4, 4), ((28, 28), 4, 1),
        ((14, 14), 8, 2), ((14, 14), 8, 1), ((7, 7), 16, 1)}
    assert all(s.kernel_size == (7, 7) and s.head_dim == 32 and 64 <= s.batch <= 128 for s in dinat)
    large = na_bench.preset_shapes("large-image")
    assert [s.dilation for s in large] == [(d, d) for d in (1, 2, 3, 4)]
    assert all(s.spatial == (128, 128) and s.kernel_size == (13, 13) for s in large)
    assert all(s.kernel_size == (3, 7, 7) for s in na_bench.preset_shapes("video"))
    assert na_bench.preset_shapes("dinat-tiny", batch=128)[0].batch == 128
    # Effective FLOPs: 4*B*H*N*K*D.
    assert dinat[0].forward_flops() == 4 * 64 * 2 * 56 * 56 * 49 * 32


def test_one_shape_type_keeps_both_recorded_label_formats():
    # Benchmark tables (na_bench, gpu_record) and sweep/audit reports label the one NAShape each
    # their own way; both formats are what docs/benchmarks.md and docs/kernel_audit.md recorded.
    shapes = {s.bench_label: s for s in na_bench.preset_shapes("dinat-mini") + na_bench.preset_shapes("tiny")}
    for recorded in ("dinat-mini s1 56x56 B8 H2 D32 k7 d8 rpb", "tiny 8x8 B2 H2 D16 k3 d1x2 causal(TF)",
                     "tiny 24 B2 H2 D16 k5 d3 rpb", "tiny 3x6x6 B2 H2 D16 k3 d1x2x1 rpb"):
        assert recorded in shapes
    assert shapes["dinat-mini s1 56x56 B8 H2 D32 k7 d1 rpb"].label == "56x56 B8 H2 D32 k7x7 d1x1 rpb"
    causal_everywhere = NAShape(1, (6, 6), 1, 8, (3, 3), (1, 1), (True, True), rpb=False, origin="c")
    assert causal_everywhere.bench_label == "c 6x6 B1 H1 D8 k3 d1 causal"
    assert causal_everywhere.label == "6x6 B1 H1 D8 k3x3 d1x1 causal1x1"
    assert NAShape.from_json(causal_everywhere.to_json()) == causal_everywhere


@pytest.mark.gpu
def test_compiled_flex_na_matches_reference_forward_and_backward_on_gpu():
    problem = Problem(2, (20, 24), 2, 32, (5, 7), (2, 3), (False, False), True)
    q, k, v, rpb = problem.tensors(dtype=torch.float32, device="cuda", requires_grad=True)
    grad = torch.randn_like(q)
    expected = kernels.na2d(q, k, v, (5, 7), (2, 3), rpb=rpb, backend="reference")
    got = FlexNA(problem.spatial, (5, 7), (2, 3), device="cuda", compile=True)(q, k, v, rpb)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, rpb), grad),
                    torch.autograd.grad(expected, (q, k, v, rpb), grad)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
def test_tiny_preset_on_gpu_checks_and_times_every_available_candidate(tmp_path):
    """On a GPU: do_bench timing, peak memory, compiled flex fwd+bwd, and every backend passes the check."""
    out = tmp_path / "bench.md"
    results = na_bench.main(["--tiny", "--device", "cuda", "--check", "all", "--warmup-ms", "5", "--rep-ms", "20",
                             "--out", str(out)])
    failed = [(r.candidate, r.shape.bench_label, r.mode, r.status, r.note) for r in results if r.ms is None]
    assert not failed
    assert all(r.peak_mib > 0 and r.tflops > 0 for r in results)
    assert all(r.err_ok for r in results if r.candidate != "sdpa")
