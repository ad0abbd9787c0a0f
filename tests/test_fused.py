"""The fused Triton backend against kernels.reference: forward, LSE and every gradient.

On a machine without a GPU the kernels run through the Triton interpreter (``tests/conftest.py``
sets ``TRITON_INTERPRET=1``), on small problems in float32/float16. ``gpu``-marked tests run the
compiled kernels at DiNAT sizes in bfloat16/float16.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from dinat import kernels  # noqa: E402
from dinat.kernels import fused, geometry, reference  # noqa: E402
from dinat.kernels.api import check_params  # noqa: E402
from dinat.kernels.fused import config, ops  # noqa: E402

from .strategies import Problem, problems  # noqa: E402

NA = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _args(p: Problem):
    return dict(kernel_size=p.kernel_size, dilation=p.dilation, is_causal=p.is_causal)


def _run(p: Problem, inputs, backend, grad_out, grad_lse, scale=None):
    """(out, lse, grads of (out . grad_out + lse . grad_lse) w.r.t. the inputs)."""
    q, k, v, rpb = inputs
    out, lse = NA[p.ndim](q, k, v, rpb=rpb, scale=scale, backend=backend, return_lse=True, **_args(p))
    leaves = [x for x in inputs if x is not None]
    grads = torch.autograd.grad((out.float() * grad_out).sum() + (lse * grad_lse).sum(), leaves)
    return out, lse, grads


def _compare(p: Problem, dtype, seed=0, scale=None, device=DEVICE):
    """Fused in ``dtype`` against the reference run in float32 on the same (rounded) values."""
    inputs = p.tensors(dtype, device=device, seed=seed, requires_grad=True)
    exact = [x.detach().float().requires_grad_() if x is not None else None for x in inputs]
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(inputs[0].shape, generator=gen).to(device)
    grad_lse = torch.randn(inputs[0].shape[:-1], generator=gen).to(device)

    out, lse, grads = _run(p, inputs, "fused", grad_out, grad_lse, scale)
    want, want_lse, want_grads = _run(p, exact, "reference", grad_out, grad_lse, scale)

    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert lse.dtype == torch.float32 and lse.shape == inputs[0].shape[:-1]
    tol = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float16: dict(rtol=2e-2, atol=2e-2),
           torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]
    torch.testing.assert_close(out.float(), want, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    queries = inputs[0].numel() // (inputs[0].shape[-1] * inputs[0].shape[-2])
    for name, got, expected in zip("qkvr", grads, want_grads):
        assert got.dtype == dtype
        # dRPB sums over every query of the batch: its rounding error grows like sqrt(queries).
        atol = tol["atol"] * (math.sqrt(queries) if name == "r" else 1.0)
        torch.testing.assert_close(got.float(), expected, rtol=tol["rtol"], atol=atol,
                                   msg=lambda m: f"grad {name}: {m}")


# Head dims: below 16 and not powers of two are padded inside the kernel (masks, no copies).
HEAD_DIMS = st.sampled_from([1, 3, 8, 16, 20])


@settings(max_examples=14, deadline=None)
@given(p=problems(max_tokens=96, head_dims=HEAD_DIMS), scale=st.sampled_from([None, 0.7]))
def test_float32_matches_reference(p, scale):
    _compare(p, torch.float32, scale=scale)


@settings(max_examples=4, deadline=None)
@given(p=problems(max_tokens=64, head_dims=st.sampled_from([8, 16])))
def test_float16_matches_reference(p):
    _compare(p, torch.float16, seed=3)


@pytest.mark.parametrize("case", [
    # Several tiles per dilation group, groups of unequal size (empty trailing tiles), RPB.
    Problem(1, (19, 21), 1, 24, (5, 3), (2, 3), (False, False), True),
    # Mixed causal/non-causal axes with an even kernel, several tiles along the causal axis.
    Problem(1, (4, 40), 2, 8, (2, 4), (1, 2), (False, True), False),
    # 3-D, per-axis dilation, RPB.
    Problem(1, (6, 5, 7), 1, 16, (3, 3, 3), (2, 1, 2), (False, False, False), True),
    # A window with more relative positions (9*9*5 = 405) than one dRPB chunk (256) holds, and a
    # halo (5*6*5 keys) walked in two blocks.
    Problem(1, (5, 7, 6), 1, 8, (5, 5, 3), (1, 1, 1), (False, False, False), True),
    # DiNAT's window: an 8x8 tile's halo is 14x14 = 196 keys, more than one block.
    Problem(1, (24, 20), 1, 16, (7, 7), (1, 1), (False, False), True),
    # 1-D, long enough for three tiles.
    Problem(2, (150,), 1, 16, (9,), (3,), (False,), True),
])
def test_multi_tile_problems(case):
    _compare(case, torch.float32, seed=5)


def _drpb_layout(spatial, kernel_size, dilation):
    query = torch.empty(1, *spatial, 1, 8)
    return ops._DrpbLayout(ops._Problem(query, kernel_size, dilation, (False,) * len(spatial)))


def test_drpb_layouts():
    """The dQ kernel maps (query, window slot) sums to dRPB bins in two ways: 2-D tiles whose regrouped
    slots fill tl.dot operands by two one-hot products (pitched slots, >= 16 bins per axis; with an RPB
    every 2-D tile does, its window being >= 3 wide), the rest (1-D, 3-D) by a gather per (query, bin).
    1-D slots are power-of-two pitched like 2-D ones (the dQ loop sums them by window class,
    backward.fold_block); 3-D keeps compact slots. test_multi_tile_problems runs each of these layouts."""
    dinat = _drpb_layout((24, 20), (7, 7), (1, 1))
    assert dinat.meta == dict(BLOCK_S=64, SLOT1=8, SLOT2=8, BLOCK_R1=16, BLOCK_R2=16, DRPB_BY_AXES=True)
    small_window = _drpb_layout((19, 21), (5, 3), (2, 3))  # 5 bins along axis 2, padded to 16
    assert small_window.meta["DRPB_BY_AXES"] and small_window.meta["BLOCK_R2"] == 16
    assert small_window.bins(torch.arange(small_window.row)).shape == (1, 9, 5)
    for spatial, kernel_size, dilation, slot2 in [((150,), (9,), (3,), 16), ((6, 5, 7), (3, 3, 3), (2, 1, 2), 3)]:
        gathered = _drpb_layout(spatial, kernel_size, dilation)
        assert not gathered.meta["DRPB_BY_AXES"], spatial
        assert gathered.meta["SLOT2"] == slot2, spatial


def test_backward_is_deterministic():
    p = Problem(2, (10, 11), 2, 16, (3, 5), (2, 1), (False, False), True)
    inputs = p.tensors(torch.float32, device=DEVICE, seed=7, requires_grad=True)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    runs = [_run(p, inputs, "fused", grad_out, torch.zeros(inputs[0].shape[:-1], device=DEVICE)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


def test_strided_qkv_views_from_fused_projection():
    """q, k, v as ``qkv.unbind`` views (no copies) give the same results as contiguous tensors."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 9, 10, 3, 2, 12, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    rpb = torch.randn(2, 5, 5, generator=gen).to(DEVICE)
    out = kernels.na2d(q, k, v, 3, (2, 1), rpb=rpb, backend="fused")
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)

    qkv_ref = qkv.detach().clone().requires_grad_()
    want = kernels.na2d(*qkv_ref.unbind(3), 3, (2, 1), rpb=rpb, backend="reference")
    (want_dqkv,) = torch.autograd.grad(want, qkv_ref, grad_out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dqkv, want_dqkv, rtol=1e-5, atol=2e-5)


def test_non_contiguous_grad_output():
    p = Problem(1, (12,), 2, 16, (5,), (2,), (True,), False)
    q, k, v, _ = p.tensors(torch.float32, device=DEVICE, seed=2, requires_grad=True)
    grad_out = torch.randn(1, 12, 16, 2, device=DEVICE).transpose(-1, -2)  # strided [1, 12, 2, 16]
    got = torch.autograd.grad(kernels.na1d(q, k, v, 5, 2, True, backend="fused"), (q, k, v), grad_out)
    want = torch.autograd.grad(kernels.na1d(q, k, v, 5, 2, True, backend="reference"), (q, k, v), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)


def _small_op_args(requires_grad=True):
    p = Problem(1, (6, 7), 2, 8, (3, 3), (2, 1), (False, False), True)
    q, k, v, rpb = p.tensors(torch.float32, device=DEVICE, seed=4, requires_grad=requires_grad)
    return p, (q, k, v, rpb, list(p.kernel_size), list(p.dilation), list(p.is_causal), 0.5)


def test_opcheck():
    _, args = _small_op_args()
    torch.library.opcheck(torch.ops.dinat.na_fused_fwd.default, args)


def test_compile_fullgraph_matches_eager():
    p, (q, k, v, rpb, *_) = _small_op_args()
    params = check_params(p.spatial, p.kernel_size, p.dilation, p.is_causal)

    def attention(q, k, v, rpb):
        out, lse = fused.na(q, k, v, params, rpb, 0.5, True)
        return out * 2.0, lse

    compiled = torch.compile(attention, fullgraph=True)
    out, lse = compiled(q, k, v, rpb)
    want, want_lse = attention(q, k, v, rpb)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, rpb))
    want_grads = torch.autograd.grad(want.sum() + want_lse.sum(), (q, k, v, rpb))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_flop_counter_counts_window_products():
    from torch.utils.flop_counter import FlopCounterMode

    p, args = _small_op_args(requires_grad=False)
    with FlopCounterMode(display=False) as counter:
        torch.ops.dinat.na_fused_fwd(*args)
    b, h, d = p.batch, p.heads, p.head_dim
    assert counter.get_total_flops() == 4 * b * h * math.prod(p.spatial) * math.prod(p.kernel_size) * d


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    """The ops work on CPU without the interpreter (reference maths, same results and gradients)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fused.unavailable_reason(torch.device("cpu")) is not None
    p = Problem(1, (9,), 1, 4, (3,), (2,), (False,), True)
    q, k, v, rpb = p.tensors(torch.float32, seed=9, requires_grad=True)
    out, lse = ops.na_fused_fwd(q, k, v, rpb, [3], [2], [False], 0.5)
    want, want_lse = reference.na(q, k, v, check_params((9,), 3, 2), rpb, 0.5, True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, rpb))
    want_grads = torch.autograd.grad(want.sum() + want_lse.sum(), (q, k, v, rpb))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_unavailable_reason():
    assert fused.unavailable_reason(torch.device(DEVICE)) is None
    assert "fused" in kernels.available_backends(DEVICE)
    assert "CUDA" in fused.unavailable_reason(torch.device("meta"))


def test_rejects_float64_huge_heads_and_too_many_heads():
    x = torch.randn(1, 8, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        kernels.na1d(x, x, x, 3, backend="fused")
    x = torch.randn(1, 8, 1, fused.MAX_HEAD_DIM + 1, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.na1d(x, x, x, 3, backend="fused")
    # A batch * heads past CUDA's grid axis 1 is launched in chunks (tests/test_offsets64.py); the
    # heads of one batch element must fit one launch.
    x = torch.randn(1, 2, fused.MAX_HEADS + 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="heads must be <= 65535"):
        kernels.na1d(x, x, x, 2, backend="fused")


def test_tile_shape_heuristic():
    assert config.tile_shape((1, 56, 56), (1, 1, 1), 2) == (1, 8, 8)
    assert config.tile_shape((1, 56, 56), (1, 8, 8), 2) == (1, 8, 8)  # 7x7 sub-grids -> 8x8
    assert config.tile_shape((1, 4, 40), (1, 1, 2), 2) == (1, 4, 16)  # short axis gives room away
    assert config.tile_shape((1, 1, 5), (1, 1, 1), 1) == (1, 1, 16)  # never below a tl.dot minimum
    assert config.tile_tokens(256, 4) == 32 and config.tile_tokens(256, 2) == config.TILE_TOKENS
    assert config.tile_shape((1, 56, 56), (1, 1, 1), 2, tokens=32) == (1, 4, 8)
    for spatial, dil, ndim in [((3, 5, 7), (1, 2, 3), 3), ((1, 1, 300), (1, 1, 4), 1), ((1, 2, 9), (1, 1, 1), 2)]:
        tile = config.tile_shape(spatial, dil, ndim)
        assert all(t & (t - 1) == 0 for t in tile) and 16 <= math.prod(tile) <= config.TILE_TOKENS



def _halo_extents(length, k, d, causal, t):
    """Per tile of ``t`` sub-grid tokens (every group): the union of the queries' windows and of
    the keys' inverse neighbourhoods, as extents along the sub-grid (from kernels.geometry)."""
    neighbors, valid, _ = geometry.axis_window(length, k, d, causal)
    tables = geometry.axis_tables(length, k, d, causal)
    out = []
    for g in range(d):
        tokens = list(range(g, length, d))
        for a in range(0, len(tokens), t):
            tile = tokens[a:a + t]
            keys = {int(j) for i in tile for j, ok in zip(neighbors[i], valid[i]) if ok}
            queries = {int(tables.inverse_start[j]) + s * d for j in tile for s in range(int(tables.inverse_count[j]))}
            span = lambda xs: (max(xs) - min(xs)) // d + 1 if xs else 1  # noqa: E731
            out.append((span(keys), span(queries)))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_halo_pitches_hold_every_halo(causal):
    """The compile-time pitches of the halo walks are powers of two at least as long as every halo
    (key halos of a key tile may exceed ``t + k - 1`` at a border: counted, and exact)."""
    for length, k, d, t in [(56, 7, 1, 8), (56, 7, 8, 8), (22, 7, 1, 8), (13, 5, 2, 4), (9, 3, 3, 2), (40, 4, 2, 16)]:
        extents = _halo_extents(length, k, d, causal, t)
        (p_query,) = config.query_halo_pitch((1, length), (1, d), (1, k), (1, t))
        (p_key,) = config.key_halo_pitch((1, length), (1, d), (1, k), (1, causal), (1, t))
        assert max(e for e, _ in extents) <= p_query and p_query & (p_query - 1) == 0
        assert config.key_halo_extent(length, d, k, causal, t) == max(e for _, e in extents)
        assert p_key == triton.next_power_of_2(max(e for _, e in extents))
    # A 7-wide sub-grid (DiNAT's dilated layers) gets pitch 8, not 16: one block of 64 keys, not two.
    assert config.query_halo_pitch((1, 56, 56), (1, 8, 8), (1, 7, 7), (1, 8, 8)) == (8, 8)


@pytest.mark.parametrize("block, case", [
    # 2-D, pitch 16 with 16-entry blocks (a block holds whole rows): many blocks per program,
    # RPB read with clamped indices at every border.
    (16, Problem(1, (12, 11), 2, 8, (5, 7), (1, 1), (False, False), True)),
    # 2-D, pitch 32 over 16-entry blocks (a row holds whole blocks), dilation, a causal axis (no RPB:
    # undefined with causal axes).
    (16, Problem(1, (4, 40), 1, 8, (3, 9), (1, 2), (False, True), False)),
    # 3-D: both pitches walked, per-axis dilation; 1-D: the axis itself is the walk.
    (32, Problem(1, (5, 6, 7), 1, 8, (3, 3, 5), (1, 2, 1), (False, False, False), True)),
    (16, Problem(1, (70,), 2, 8, (9,), (2,), (False,), True)),
    # Single-block programs: 7-wide sub-grids (pitch 8) walked in one 64-entry block.
    (64, Problem(1, (21, 14), 1, 8, (7, 7), (3, 2), (False, False), True)),
    # dRPB by window class (backward.fold_block): the GPU default, 64-entry blocks of 4 rows on pitch
    # 16 filling one of two groups of 8 classes per block (at the borders too), ...
    (64, Problem(2, (20, 19), 2, 8, (7, 7), (1, 1), (False, False), True)),
    # ... blocks of more rows than classes (pitch 16, kernel 3: 4 classes, 8 rows per block), ...
    (128, Problem(1, (13, 12), 1, 8, (3, 3), (1, 1), (False, False), True)),
    # ... and the slot gather it falls back to when a block is narrower than the window classes
    # (1-D kernel 33: 64 classes, 32-entry blocks).
    (32, Problem(1, (80,), 1, 8, (33,), (1,), (False,), True)),
])
def test_pitched_walks_in_small_blocks(block, case, monkeypatch):
    """The interpreter's one config uses 128-entry blocks; smaller ones reach every walk path."""
    from dinat.kernels.fused import backward, forward

    for kernel, name in ((forward.na_fwd_kernel, "BLOCK_K"), (backward.na_bwd_dq_kernel, "BLOCK_K"),
                         (backward.na_bwd_dkdv_kernel, "BLOCK_Q")):
        monkeypatch.setattr(kernel, "configs", [triton.Config({name: block}, num_warps=4, num_stages=1)])
    _compare(case, torch.float32, seed=6)


# ---- GPU: the compiled kernels at DiNAT sizes -------------------------------------------------

GPU_DILATIONS = [1, 2, 4, 8]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dilation", GPU_DILATIONS)
def test_gpu_dinat_sizes(dtype, dilation):
    p = Problem(4, (56, 56), 2, 32, (7, 7), (dilation, dilation), (False, False), True)
    _compare(p, dtype, seed=dilation, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 24, 48, 64, 80, 128, 256])
def test_gpu_head_dims(head_dim):
    p = Problem(2, (20, 24), 3, head_dim, (5, 7), (2, 3), (False, True), False)
    _compare(p, torch.float16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Problem(2, (1000,), 2, 64, (33,), (4,), (True,), False),
    Problem(2, (12, 14, 16), 2, 32, (3, 5, 7), (2, 1, 2), (False, False, False), True),
    Problem(2, (56, 56), 2, 32, (7, 7), (1, 1), (False, False), True),
])
def test_gpu_float32_ranks(case):
    _compare(case, torch.float32, device="cuda")


@pytest.mark.gpu
def test_gpu_backward_deterministic_and_compiled():
    p = Problem(4, (56, 56), 2, 32, (7, 7), (3, 3), (False, False), True)
    inputs = p.tensors(torch.bfloat16, device="cuda", seed=1, requires_grad=True)
    grad_out = torch.randn(inputs[0].shape, device="cuda")
    zeros = torch.zeros(inputs[0].shape[:-1], device="cuda")
    first, second = (_run(p, inputs, "fused", grad_out, zeros) for _ in range(2))
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)

    params = check_params(p.spatial, p.kernel_size, p.dilation, p.is_causal)
    compiled = torch.compile(lambda q, k, v, r: fused.na(q, k, v, params, r, 32 ** -0.5, False), fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), first[0])
