"""The "tiled" PyTorch backend against the dense brute force, its tables against the window rule,
and "auto" choosing it wherever the Triton backends do not run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinat import kernels
from dinat import models  # noqa: F401  (registers dinat_* with timm)
from dinat.kernels import backends, geometry, tiled
from dinat.kernels.geometry import NAParams

from .brute_force import dense_na
from .strategies import Problem, problems

NA = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}


def _args(p: Problem):
    return dict(kernel_size=p.kernel_size, dilation=p.dilation, is_causal=p.is_causal)


@settings(max_examples=30, deadline=None)
@given(p=problems(max_tokens=160), return_lse=st.booleans())
def test_forward_lse_and_gradients_match_brute_force(p, return_lse):
    q, k, v, rpb = p.tensors(torch.float64, requires_grad=True, seed=5)
    inputs = [x for x in (q, k, v, rpb) if x is not None]
    got = NA[p.ndim](q, k, v, rpb=rpb, backend="tiled", return_lse=return_lse, **_args(p))
    want = dense_na(q, k, v, p.kernel_size, p.dilation, p.is_causal, rpb, return_lse=return_lse)
    if return_lse:
        (got, lse), (want, want_lse) = got, want
        assert lse.dtype == torch.float32
        torch.testing.assert_close(lse, want_lse.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(got)
    for name, g, e in zip("qkvr", torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@settings(max_examples=8, deadline=None)
@given(p=problems(max_tokens=128))
def test_low_precision_is_close_to_float64(p, dtype, tol):
    q, k, v, rpb = p.tensors(dtype, seed=6)
    out = NA[p.ndim](q, k, v, rpb=rpb, backend="tiled", **_args(p))
    assert out.dtype == dtype
    want = dense_na(q.double(), k.double(), v.double(), p.kernel_size, p.dilation, p.is_causal,
                    None if rpb is None else rpb.double())
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_gradcheck_float64_dilated_uneven_with_rpb_and_causal():
    # 7 = 2*3 + 1 and 10 = 3*3 + 1 tokens at dilation 2 and 3: sub-grids of two lengths on both axes.
    q, k, v = (torch.randn(1, 7, 10, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, r: kernels.na2d(q, k, v, 3, (2, 3), rpb=r, backend="tiled"),
                                    (q, k, v, rpb), fast_mode=True)
    assert torch.autograd.gradcheck(lambda q, k, v: kernels.na2d(q, k, v, (2, 3), (3, 1), (True, False), backend="tiled"),
                                    (q, k, v), fast_mode=True)


@settings(max_examples=15, deadline=None)
@given(p=problems(max_tokens=128, rpb=True))
def test_fused_sdpa_path_with_a_frozen_rpb_matches_brute_force(p):
    """Without an lse and without an rpb gradient, the tiles go through scaled_dot_product_attention
    (the fused path), the q/k/v gradients through its backward; an rpb gradient takes the other path."""
    q, k, v, rpb = p.tensors(torch.float64, requires_grad=True, seed=8)
    rpb = None if rpb is None else rpb.detach()  # even kernels and causal axes take no rpb
    calls = []
    original = tiled.F.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiled.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
        got = NA[p.ndim](q, k, v, rpb=rpb, backend="tiled", **_args(p))
        assert calls, "the fused path was not taken"
        if rpb is not None:
            calls.clear()
            NA[p.ndim](q, k, v, rpb=rpb.detach().requires_grad_(True), backend="tiled", **_args(p))
            assert not calls
    want = dense_na(q, k, v, p.kernel_size, p.dilation, p.is_causal, rpb)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(got)
    for name, g, e in zip("qkv", torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(want, (q, k, v), grad_out)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_strided_and_non_contiguous_inputs():
    qkv = torch.randn(2, 9, 11, 3, 2, 8)  # a fused qkv projection, unbound: strided views
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(2, 5, 5)
    out = kernels.na2d(q, k, v, 3, (2, 3), rpb=rpb, backend="tiled")
    want = kernels.na2d(q.contiguous(), k.contiguous(), v.contiguous(), 3, (2, 3), rpb=rpb, backend="reference")
    torch.testing.assert_close(out, want)
    qt = torch.randn(2, 8, 11, 9, 2).transpose(1, 3)  # head dim 8 with stride != 1 elsewhere
    torch.testing.assert_close(kernels.na2d(qt, qt, qt, 3, backend="tiled"),
                               kernels.na2d(qt, qt, qt, 3, backend="reference"))


def test_chunking_over_batch_gives_the_same_result(monkeypatch):
    q, k, v = (torch.randn(5, 10, 12, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    whole, whole_lse = kernels.na2d(q, k, v, 3, (2, 1), rpb=rpb, backend="tiled", return_lse=True)
    grads = torch.autograd.grad(whole.sum() + whole_lse.sum(), (q, k, v, rpb))
    monkeypatch.setattr(tiled, "CHUNK_ELEMENTS", 1)  # one batch x sub-grid per chunk
    chunked, chunked_lse = kernels.na2d(q, k, v, 3, (2, 1), rpb=rpb, backend="tiled", return_lse=True)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(chunked_lse, whole_lse)
    for g, w in zip(torch.autograd.grad(chunked.sum() + chunked_lse.sum(), (q, k, v, rpb)), grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_head_dim_beyond_kernel_limits_and_one():
    for head_dim in (1, 300):
        q, k, v = (torch.randn(1, 12, 2, head_dim, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(kernels.na1d(q, k, v, 5, 2, backend="tiled"), dense_na(q, k, v, (5,), (2,), (False,)))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 8, 9, 2, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)

    def attention(q, k, v, rpb):
        return kernels.na2d(q, k, v, 3, (2, 3), rpb=rpb, backend="tiled", return_lse=True)

    def outputs_and_grads(fn):
        out, lse = fn(q, k, v, rpb)
        return [out, lse, *torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, rpb))]

    # aot_eager traces forward and backward with fake tensors (what Inductor sees) without C++ builds.
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    for got, want in zip(outputs_and_grads(compiled), outputs_and_grads(attention)):
        torch.testing.assert_close(got, want)

    def fused_attention(q, k, v, rpb):  # no lse, frozen rpb: the scaled_dot_product_attention path
        return kernels.na2d(q, k, v, 3, (2, 3), rpb=rpb.detach(), backend="tiled")

    def output_and_qkv_grads(fn):
        out = fn(q, k, v, rpb)
        return [out, *torch.autograd.grad(out.sum(), (q, k, v))]

    compiled = torch.compile(fused_attention, fullgraph=True, backend="aot_eager")
    for got, want in zip(output_and_qkv_grads(compiled), output_and_qkv_grads(fused_attention)):
        torch.testing.assert_close(got, want)


# --- the tables -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(p=problems(ndims=(1, 2), max_dilation=(1, 1, 1), max_tokens=144), tile=st.integers(1, 9))
def test_tile_tables_hold_exactly_each_query_window(p, tile):
    """Per query: the halo keys with a bias index are its window's (valid) neighbours, with their
    rpb indices; every query sits in one tile row that output_index points to."""
    tables = geometry.tile_tables(p.spatial, p.kernel_size, p.is_causal, (tile,) * p.ndim)
    params = NAParams(p.kernel_size, (1,) * p.ndim, p.is_causal)
    index, valid, rpb_bin = geometry.neighborhood(p.spatial, params)
    T, tile_size, halo = tables.num_tiles, tables.tile_size, tables.halo_size
    queries = tables.query_index.view(T, tile_size)
    keys = tables.halo_index.view(T, halo)
    assert tables.num_rpb == math.prod(2 * k - 1 for k in p.kernel_size)
    n = math.prod(p.spatial)
    assert torch.equal(tables.query_index[tables.output_index], torch.arange(n))
    for t in range(T):
        for pos in range(tile_size):
            query = int(queries[t, pos])
            inside = tables.bias_index[t, pos] != tables.num_rpb
            got = dict(zip(keys[t][inside].tolist(), tables.bias_index[t, pos][inside].tolist()))
            slots = valid[query] if valid is not None else torch.ones(index.shape[1], dtype=torch.bool)
            want = dict(zip(index[query][slots].tolist(), rpb_bin[query][slots].tolist()))
            assert got == want


# --- backend selection ------------------------------------------------------------------------


def test_auto_picks_tiled_without_triton_and_the_reference_for_qk_av():
    """Changed by issue 13: "auto" on CPU (and MPS, ...) is "tiled" for naXd, no longer the reference;
    the logits-materialising qk/av ops, which "tiled" does not provide, stay on the reference."""
    for device in ("cpu", "mps", "xpu"):
        assert backends.resolve("auto", torch.device(device), "na").__name__ == "dinat.kernels.tiled"
        for op in ("qk", "av"):
            assert backends.resolve("auto", torch.device(device), op).__name__ == "dinat.kernels.reference"
    assert backends.resolve("auto", torch.device("meta"), "na").__name__ == "dinat.kernels.reference"  # FLOP counts
    assert "tiled" in kernels.available_backends("cpu")
    with pytest.raises(ValueError, match=r"backend='tiled' is unavailable for tensors on cpu: it has no separate qk op"):
        kernels.na2d_qk(torch.randn(1, 5, 5, 1, 2), torch.randn(1, 5, 5, 1, 2), 3, backend="tiled")


def test_benchmarking_switch_makes_auto_run_the_reference_in_every_process():
    """benchmarks/reference_auto (a sitecustomize on PYTHONPATH) gives the "before issue 13" auto
    choice for before/after timings; without it auto is tiled."""
    repo = Path(__file__).resolve().parents[1]
    probe = "import torch; from dinat import kernels; print(kernels.backends.resolve('auto', torch.device('cpu')).__name__)"
    for path, expected in ((f"{repo}{os.pathsep}{repo / 'benchmarks' / 'reference_auto'}", "dinat.kernels.reference"),
                           (str(repo), "dinat.kernels.tiled")):
        out = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": path})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected


def test_auto_on_cuda_falls_back_to_tiled_after_the_triton_backends(monkeypatch):
    cuda = torch.device("cuda")
    assert backends.AUTO_ORDER["cuda"] == ("fused", "unfused", "tiled", "reference")
    for name in ("fused", "unfused"):  # as on a CUDA machine without a working Triton
        monkeypatch.setitem(backends._LOADED, name, (None, "it cannot be imported (test)"))
    assert backends.resolve("auto", cuda, "na").__name__ == "dinat.kernels.tiled"
    assert backends.resolve("auto", cuda, "qk").__name__ == "dinat.kernels.reference"


def test_models_run_tiled_by_default_on_cpu_and_match_the_reference(monkeypatch):
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), kernel_size=3,
                  dilations=((3,), (1,), (1, 2), (1,)), drop_path_rate=0.0)
    reference = timm.create_model("dinat_mini", na_backend="reference", **kwargs).double()
    model = timm.create_model("dinat_mini", **kwargs).double()  # na_backend="auto" -> tiled on CPU
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 56, 60, dtype=torch.float64)  # 14x15 tokens at level 0: uneven sub-grids
    calls = []
    original = tiled.na
    monkeypatch.setattr(tiled, "na", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    out = model(x)
    assert len(calls) == 5
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-8, atol=1e-10, msg=name)
