"""The reference op against the independent dense brute force, and its own invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinat import kernels
from dinat.kernels import geometry
from dinat.kernels.geometry import NAParams

from .brute_force import dense_na, window_logits
from .strategies import Problem, problems

NA = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}
QK = {1: kernels.na1d_qk, 2: kernels.na2d_qk, 3: kernels.na3d_qk}
AV = {1: kernels.na1d_av, 2: kernels.na2d_av, 3: kernels.na3d_av}


def _args(p: Problem):
    return dict(kernel_size=p.kernel_size, dilation=p.dilation, is_causal=p.is_causal)


@settings(max_examples=60, deadline=None)
@given(p=problems())
def test_forward_and_gradients_match_brute_force(p):
    q, k, v, rpb = p.tensors(torch.float64, requires_grad=True, seed=1)
    inputs = [x for x in (q, k, v, rpb) if x is not None]
    out, lse = NA[p.ndim](q, k, v, rpb=rpb, backend="reference", return_lse=True, **_args(p))
    want, want_lse = dense_na(q, k, v, p.kernel_size, p.dilation, p.is_causal, rpb, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-6, atol=1e-6)

    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(want, inputs, grad_out)
    for name, g, e in zip("qkvr", got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@settings(max_examples=40, deadline=None)
@given(p=problems(max_tokens=96))
def test_qk_logits_match_brute_force_slot_order(p):
    q, k, _, rpb = p.tensors(torch.float64, seed=2)
    got = QK[p.ndim](q, k, rpb=rpb, **_args(p))
    want = window_logits(q, k, p.kernel_size, p.dilation, p.is_causal, rpb)
    assert got.shape == (*q.shape[:-1], math.prod(p.kernel_size))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(p=problems(), scale=st.floats(0.1, 2.0))
def test_na_equals_qk_softmax_av(p, scale):
    q, k, v, rpb = p.tensors(torch.float64, seed=3)
    out = NA[p.ndim](q, k, v, rpb=rpb, scale=scale, **_args(p))
    logits = QK[p.ndim](q, k, **_args(p)) * scale
    if rpb is not None:
        # rpb enters after scaling: qk(q * scale, k, rpb) is the same logits.
        with_rpb = QK[p.ndim](q * scale, k, rpb=rpb, **_args(p))
        logits = with_rpb
    composed = AV[p.ndim](torch.softmax(logits, -1), v, **_args(p))
    torch.testing.assert_close(out, composed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@settings(max_examples=10, deadline=None)
@given(p=problems(max_tokens=128))
def test_low_precision_is_close_to_float64(p, dtype, tol):
    q, k, v, rpb = p.tensors(dtype, seed=4)
    out = NA[p.ndim](q, k, v, rpb=rpb, **_args(p))
    assert out.dtype == dtype
    want = dense_na(*(x.double() if x is not None else None for x in (q, k, v)), p.kernel_size, p.dilation,
                    p.is_causal, rpb.double() if rpb is not None else None)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_av_ignores_unused_causal_slots():
    p = Problem(1, (9,), 2, 4, (4,), (2,), (True,), False)
    q, k, v, _ = p.tensors(torch.float64)
    attn = torch.softmax(kernels.na1d_qk(q, k, 4, 2, True), -1)
    garbage = torch.where(torch.isinf(kernels.na1d_qk(q, k, 4, 2, True)), 7.0, attn)
    torch.testing.assert_close(kernels.na1d_av(garbage, v, 4, 2, True), kernels.na1d_av(attn, v, 4, 2, True))


def test_strided_views_from_fused_qkv():
    B, H, W, heads, D = 2, 9, 10, 2, 8
    qkv = torch.randn(B, H, W, 3, heads, D)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out = kernels.na2d(q, k, v, 3, (2, 3))
    torch.testing.assert_close(out, kernels.na2d(q.contiguous(), k.contiguous(), v.contiguous(), 3, (2, 3)))


def test_dinat_tiny_layer_at_56x56_runs_on_cpu():
    """Memory is O(N * K * D): a DiNAT-tiny stage-1 layer (dilation 8) fits easily on a CPU."""
    q, k, v = (torch.randn(2, 56, 56, 2, 32, requires_grad=True) for _ in range(3))
    rpb = torch.zeros(2, 13, 13, requires_grad=True)
    out = kernels.na2d(q, k, v, 7, 8, rpb=rpb)
    out.sum().backward()
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rpb.grad.abs().sum() > 0


# --- geometry invariants ---------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(k=st.integers(2, 9), d=st.integers(1, 5), extra=st.integers(0, 12), causal=st.booleans())
def test_axis_window_rules(k, d, extra, causal):
    L = k * d + extra
    nb, valid, rel = geometry.axis_window(L, k, d, causal)
    i = torch.arange(L)[:, None]
    assert ((nb >= 0) & (nb < L)).all()
    assert ((nb - i) % d == 0).all(), "attention never crosses dilation groups"
    assert ((rel >= 0) & (rel <= 2 * k - 2)).all()
    assert (rel == (nb - i) // d + k - 1).all()
    if causal:
        assert (valid == (nb <= i)).all()
        assert valid.sum(1).min() >= 1
    else:
        assert valid.all()
        assert (nb.diff(dim=1) == d).all(), "k distinct, consecutive sub-grid neighbours"
        assert ((nb[:, :1] <= i) & (i <= nb[:, -1:])).all(), "every query sits inside its own window"


@settings(max_examples=200, deadline=None)
@given(k=st.integers(2, 9), d=st.integers(1, 5), extra=st.integers(0, 12), causal=st.booleans())
def test_inverse_tables_match_windows(k, d, extra, causal):
    L = k * d + extra
    nb, valid, _ = geometry.axis_window(L, k, d, causal)
    tables = geometry.axis_tables(L, k, d, causal)
    assert (tables.window_start.long() == nb[:, 0]).all()
    assert tables.inverse_count.max() <= geometry.max_inverse_count(k, causal)
    for j in range(L):
        queries = {i for i in range(L) if (valid[i] & (nb[i] == j)).any()}
        start, count = int(tables.inverse_start[j]), int(tables.inverse_count[j])
        assert queries == {start + s * d for s in range(count)}


def test_neighborhood_flat_order_is_row_major():
    params = NAParams((3, 2), (1, 2), (False, False))
    index, valid, rpb_bin = geometry.neighborhood((5, 6), params)
    assert valid is None and index.shape == (30, 6)
    nb0, _, r0 = geometry.axis_window(5, 3, 1, False)
    nb1, _, r1 = geometry.axis_window(6, 2, 2, False)
    i0, i1 = 4, 3
    expected = [a * 6 + b for a in nb0[i0].tolist() for b in nb1[i1].tolist()]
    assert index[i0 * 6 + i1].tolist() == expected
    expected_rel = [a * 3 + b for a in r0[i0].tolist() for b in r1[i1].tolist()]
    assert rpb_bin[i0 * 6 + i1].tolist() == expected_rel
