"""Backend "unfused" (Triton, logits materialised) against the reference op.

On CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
interpreter tests use float32/float16 only (the interpreter mishandles bfloat16). GPU-marked tests
compare bfloat16/float16 at DiNAT sizes.
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from dinat import kernels  # noqa: E402
from dinat.kernels import reference, unfused  # noqa: E402
from dinat.kernels.api import check_params  # noqa: E402
from dinat.kernels.geometry import NAParams  # noqa: E402

from .brute_force import window  # noqa: E402
from .strategies import Problem, problems  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NA = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}
QK = {1: kernels.na1d_qk, 2: kernels.na2d_qk, 3: kernels.na3d_qk}
AV = {1: kernels.na1d_av, 2: kernels.na2d_av, 3: kernels.na3d_av}
# Max error allowed, relative to the largest reference value (at least 1).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _args(p: Problem):
    return dict(kernel_size=p.kernel_size, dilation=p.dilation, is_causal=p.is_causal)


def _params(p: Problem) -> NAParams:
    return NAParams(p.kernel_size, p.dilation, p.is_causal)


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{what}: -inf slots differ"
    assert torch.equal(got[~finite], want[~finite]), f"{what}: non-finite values differ"
    err = (got[finite].double() - want[finite].double()).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, want[finite].double().abs().max().item()) if finite.any() else 1.0
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} > {TOLERANCE[dtype]:.1g} * {scale:.3g}"


def _na_outputs(backend, p, q, k, v, rpb, scale):
    """Output, LSE and every gradient of ``na`` for a fixed upstream gradient."""
    out, lse = NA[p.ndim](q, k, v, rpb=rpb, scale=scale, backend=backend, return_lse=True, **_args(p))
    inputs = [x for x in (q, k, v, rpb) if x is not None]
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).cos()
    loss = (out.float() * weights).sum() + lse.sum() * 0.5
    return (out, lse, *torch.autograd.grad(loss, inputs))


@settings(max_examples=8, deadline=None)
@given(p=problems(max_tokens=64, head_dims=st.sampled_from([8, 12])),
       dtype=st.sampled_from([torch.float32, torch.float16]), scale=st.sampled_from([None, 0.7]))
def test_na_forward_and_gradients_match_reference(p, dtype, scale):
    q, k, v, rpb = p.tensors(dtype, device=DEVICE, seed=1, requires_grad=True)
    got = _na_outputs("unfused", p, q, k, v, rpb, scale)
    want = _na_outputs("reference", p, q, k, v, rpb, scale)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv", "drpb"], got, want):
        assert_near(g, w, dtype, name)


@settings(max_examples=6, deadline=None)
@given(p=problems(max_tokens=64, head_dims=st.sampled_from([8, 12])),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_qk_and_av_forward_and_gradients_match_reference(p, dtype):
    q, k, v, rpb = p.tensors(dtype, device=DEVICE, seed=2, requires_grad=True)
    results = {}
    for backend in ("unfused", "reference"):
        logits = QK[p.ndim](q, k, rpb=rpb, backend=backend, **_args(p))
        attn = torch.softmax(logits.float(), -1).to(dtype).detach().requires_grad_(True)
        out = AV[p.ndim](attn, v, backend=backend, **_args(p))
        weights = torch.linspace(-1, 1, logits.numel(), device=DEVICE).reshape(logits.shape).sin()
        qk_inputs = [x for x in (q, k, rpb) if x is not None]
        qk_grads = torch.autograd.grad((logits.float().nan_to_num(0.0, 0.0, 0.0) * weights).sum(), qk_inputs)
        av_grads = torch.autograd.grad((out.float() * out.float().detach().cos()).sum(), [attn, v])
        results[backend] = (logits, out, *qk_grads, *av_grads)
    names = ["logits", "av", "dq", "dk", *(["drpb"] if rpb is not None else []), "dattn", "dv"]
    for name, g, w in zip(names, results["unfused"], results["reference"]):
        assert_near(g, w, dtype, name)


def test_av_ignores_unused_causal_slots():
    p = Problem(1, (9, 6), 2, 8, (3, 2), (2, 1), (True, True), False)
    _, _, v, _ = p.tensors(torch.float32, device=DEVICE)
    attn = torch.randn(1, 9, 6, 2, 6, device=DEVICE)
    noisy = attn.clone()
    _, valid, _ = kernels.geometry.neighborhood(p.spatial, _params(p), DEVICE)
    noisy.view(-1, 2, 6).transpose(0, 1)[:, ~valid] = float("nan")
    got = kernels.na2d_av(noisy, v, **_args(p), backend="unfused")
    assert torch.isfinite(got).all()
    assert_near(got, kernels.na2d_av(attn, v, **_args(p), backend="reference"), torch.float32, "av")


@pytest.mark.parametrize("p", [
    Problem(2, (11,), 2, 8, (4,), (2,), (True,), False),  # 1-D, even k, causal, dilated
    Problem(1, (6, 5, 7), 1, 8, (3, 2, 3), (2, 1, 2), (True, False, True), False),  # 3-D, mixed causal
    Problem(1, (5, 6, 4), 2, 8, (3, 3, 3), (1, 2, 1), (False, False, False), True),  # 3-D with RPB
], ids=["1d-causal-even", "3d-mixed-causal", "3d-rpb"])
def test_fixed_cases_match_reference(p):
    q, k, v, rpb = p.tensors(torch.float32, device=DEVICE, seed=12, requires_grad=True)
    got = _na_outputs("unfused", p, q, k, v, rpb, 0.5)
    want = _na_outputs("reference", p, q, k, v, rpb, 0.5)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv", "drpb"], got, want):
        assert_near(g, w, torch.float32, name)


@pytest.mark.parametrize("head_dim", [24, 100])
def test_head_dims_not_a_power_of_two_and_over_one_chunk(head_dim):
    p = Problem(1, (7, 8), 2, head_dim, (3, 3), (2, 1), (False, False), True)
    q, k, v, rpb = p.tensors(torch.float32, device=DEVICE, seed=3, requires_grad=True)
    got = _na_outputs("unfused", p, q, k, v, rpb, None)
    want = _na_outputs("reference", p, q, k, v, rpb, None)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv", "drpb"], got, want):
        assert_near(g, w, torch.float32, name)


def test_backward_is_bit_identical_run_to_run():
    p = Problem(1, (10, 9), 2, 8, (5, 3), (2, 3), (False, False), True)
    q, k, v, rpb = p.tensors(torch.float32, device=DEVICE, seed=4, requires_grad=True)
    first = _na_outputs("unfused", p, q, k, v, rpb, None)
    second = _na_outputs("unfused", p, q, k, v, rpb, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_strided_qkv_views_are_read_in_place():
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 6, 7, 3, 2, 8, generator=gen).to(DEVICE).requires_grad_(True)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    args = dict(kernel_size=3, dilation=(2, 1))
    out = kernels.na2d(q, k, v, **args, backend="unfused")
    (d_qkv,) = torch.autograd.grad(out.sum(), qkv)
    dense = qkv.detach().clone().requires_grad_(True)
    want = kernels.na2d(*(x.contiguous() for x in dense.unbind(3)), **args, backend="unfused")
    (want_grad,) = torch.autograd.grad(want.sum(), dense)
    assert torch.equal(out, want) and torch.equal(d_qkv, want_grad)
    # The strides reach the kernel unchanged (no copy): a padded 2-D view keeps its own strides.
    from dinat.kernels.triton_utils import Padded3
    assert Padded3.of(q.shape[1:-2], check_params((8, 8), 3)).strides(q) == (q.stride(0), 0, q.stride(1), q.stride(2), q.stride(3), q.stride(4))


def test_float64_is_rejected_with_the_dtype_rule():
    q = torch.randn(1, 8, 8, 1, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32.*float64"):
        kernels.na2d(q, q, q, 3, backend="unfused")
    with pytest.raises(TypeError, match="float64"):
        kernels.na2d_qk(q, q, 3, backend="unfused")
    with pytest.raises(TypeError, match="float64"):
        kernels.na2d_av(torch.randn(1, 8, 8, 1, 9, dtype=torch.float64, device=DEVICE), q, 3, backend="unfused")


def test_unavailable_reason(monkeypatch):
    assert unfused.unavailable_reason(torch.device(DEVICE)) is None
    assert "unfused" in kernels.available_backends(DEVICE)
    assert "CUDA" in unfused.unavailable_reason(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in unfused.unavailable_reason(torch.device("cpu"))


def _op_samples():
    p = Problem(1, (6, 5), 2, 8, (3, 3), (2, 1), (False, False), True)
    q, k, v, rpb = p.tensors(torch.float32, device=DEVICE, seed=6, requires_grad=True)
    geometry = ([3, 3], [2, 1], [False, False])
    attn = torch.randn(1, 6, 5, 2, 9, device=DEVICE).softmax(-1).requires_grad_(True)
    grad_logits = torch.randn(1, 6, 5, 2, 9, device=DEVICE)
    causal = ([3, 2], [1, 2], [True, False])
    return [
        (torch.ops.dinat.na_qk, (q, k, rpb, *geometry, 0.5, True)),
        (torch.ops.dinat.na_qk, (q, k, None, *causal, 1.0, False)),
        (torch.ops.dinat.na_av, (attn, v, *geometry)),
        (torch.ops.dinat.na_qk_backward, (grad_logits, q.detach(), k.detach(), *geometry, 0.5)),
        (torch.ops.dinat.na_rpb_backward, (grad_logits, *geometry)),
        (torch.ops.dinat.na_av_backward, (torch.randn_like(v), attn.detach(), v.detach(), *geometry)),
    ]


def test_custom_ops_pass_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


def _brute_force_rpb_grad(grad_logits, kernel_size, dilation, is_causal):
    """dRPB by scalar Python over every (query, slot) that takes part (``tests.brute_force.window``)."""
    spatial, heads = tuple(grad_logits.shape[1:-2]), grad_logits.shape[-2]
    bins = [2 * k - 1 for k in kernel_size]
    flat_bin = torch.full((math.prod(spatial), math.prod(kernel_size)), math.prod(bins), dtype=torch.long)
    for n, pos in enumerate(itertools.product(*(range(s) for s in spatial))):
        for t, (_, takes_part, rel) in enumerate(window(pos, spatial, kernel_size, dilation, is_causal)):
            if takes_part:
                flat_bin[n, t] = sum(r * math.prod(bins[a + 1:]) for a, r in enumerate(rel))
    g = grad_logits.detach().cpu().double().reshape(grad_logits.shape[0], -1, heads, flat_bin.shape[1])
    out = torch.zeros(heads, math.prod(bins) + 1, dtype=torch.float64)  # last bin: slots that take no part
    out.index_add_(1, flat_bin.reshape(-1), g.sum(0).permute(1, 0, 2).reshape(heads, -1))
    return out[:, :-1].reshape(heads, *bins)


# Each case reaches a path of the dRPB reduction (kernels/unfused/rpb_kernels.py).
@pytest.mark.parametrize("batch,spatial,heads,kernel_size,dilation,is_causal", [
    # border runs of 5 tokens cut in 2 pieces, interior runs of 6 and 18 in 2 each; 4 tokens per lane step
    (2, (16, 20), 2, (3, 3), (5, 1), (False, False)),
    # causal, even kernel, dilated; 33 batch elements: a second, partly masked block of batch lanes
    (33, (14,), 2, (4,), (3,), (True,)),
    # 3-D, mixed causal, 72 slots: two chunks of slots; unused causal slots of the gradient are ignored
    (1, (3, 5, 8), 1, (3, 3, 8), (1, 1, 1), (True, False, False)),
    # every axis as long as k * d (DiNAT's dilated layers): interior runs of d tokens, like the borders
    (3, (9, 6), 2, (3, 3), (3, 2), (False, True)),
], ids=["2d-pieces", "1d-causal-batch-blocks", "3d-slot-chunks", "2d-length-k-times-d"])
def test_rpb_grad_matches_brute_force(batch, spatial, heads, kernel_size, dilation, is_causal):
    gen = torch.Generator().manual_seed(13)
    grad_logits = torch.randn(batch, *spatial, heads, math.prod(kernel_size), generator=gen).to(DEVICE)
    geometry = (list(kernel_size), list(dilation), list(is_causal))
    got = torch.ops.dinat.na_rpb_backward(grad_logits, *geometry)
    assert got.dtype == torch.float32
    want = _brute_force_rpb_grad(grad_logits, kernel_size, dilation, is_causal)
    assert_near(got.double().cpu(), want, torch.float32, "drpb")
    if batch > 32:  # two batch blocks summed in a fixed order: bit-identical run to run
        assert torch.equal(got, torch.ops.dinat.na_rpb_backward(grad_logits, *geometry))


def test_torch_fallback_matches_reference(monkeypatch):
    """CPU without the interpreter: the ops run their plain-PyTorch formulas (forward and backward)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = Problem(2, (7, 6), 2, 8, (3, 2), (2, 1), (True, False), False)
    for problem in (p, Problem(1, (9,), 2, 8, (3,), (3,), (False,), True)):
        q, k, v, rpb = problem.tensors(torch.float32, seed=7, requires_grad=True)
        params = _params(problem)
        inputs = [x for x in (q, k, v, rpb) if x is not None]
        results = []
        for impl in (unfused, reference):
            out, lse = impl.na(q, k, v, params, rpb, 0.4, True)
            logits = impl.qk(q, k, params, rpb)
            grads = torch.autograd.grad((out * out.detach().sin()).sum() + lse.sum(), inputs)
            results.append((out, lse, logits, *grads))
        for name, g, w in zip(["out", "lse", "logits", "dq", "dk", "dv", "drpb"], *results):
            assert_near(g, w, torch.float32, name)


def test_torch_compile_fullgraph_traces_the_ops():
    torch._dynamo.reset()
    p = Problem(1, (6, 6), 2, 8, (3, 3), (1, 2), (False, False), True)
    q, k, v, rpb = p.tensors(torch.float32, device=DEVICE, seed=8, requires_grad=True)
    params = _params(p)

    def attention(q, k, v, rpb):
        return unfused.na(q, k, v, params, rpb, 0.5, False)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    got = compiled(q, k, v, rpb)
    want = attention(q, k, v, rpb)
    assert_near(got, want, torch.float32, "out")
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v, rpb)), torch.autograd.grad(want.sum(), (q, k, v, rpb))):
        assert_near(g, w, torch.float32, "grad")


def test_flop_counter_counts_na():
    from torch.utils.flop_counter import FlopCounterMode

    p = Problem(2, (6, 7), 2, 8, (3, 3), (2, 1), (False, False), False)
    q, k, v, _ = p.tensors(torch.float32, device=DEVICE, seed=9, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = kernels.na2d(q, k, v, 3, dilation=(2, 1), backend="unfused")
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    one = 2 * 2 * (6 * 7) * 2 * 9 * 8  # 2 * B * N * H * K * D
    assert counts[torch.ops.dinat.na_qk] == one
    assert counts[torch.ops.dinat.na_av] == one
    assert counts[torch.ops.dinat.na_qk_backward] == 2 * one
    assert counts[torch.ops.dinat.na_av_backward] == 2 * one


# --------------------------------------------------------------------------------------------
# GPU: DiNAT sizes, half precision.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
def test_gpu_dinat_sizes_match_reference(dtype, dilation):
    p = Problem(4, (56, 56), 2, 32, (7, 7), (dilation, dilation), (False, False), True)
    q, k, v, rpb = p.tensors(dtype, device="cuda", seed=10, requires_grad=True)
    got = _na_outputs("unfused", p, q, k, v, rpb, None)
    want = _na_outputs("reference", p, q, k, v, rpb, None)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv", "drpb"], got, want):
        assert_near(g, w, dtype, name)
    again = _na_outputs("unfused", p, q, k, v, rpb, None)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(p=problems(head_dims=st.sampled_from([8, 24, 32, 64, 96, 128, 256])),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_gpu_small_problems_match_reference(p, dtype):
    q, k, v, rpb = p.tensors(dtype, device="cuda", seed=11, requires_grad=True)
    got = _na_outputs("unfused", p, q, k, v, rpb, None)
    want = _na_outputs("reference", p, q, k, v, rpb, None)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv", "drpb"], got, want):
        assert_near(g, w, dtype, name)
