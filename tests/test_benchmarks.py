"""The benchmark's alternatives compute what they claim, and the CPU smoke run works end to end."""

from __future__ import annotations

import pytest
import torch

import kernels
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,use_rpb", FLEX_CASES)
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


def test_sdpa_full_is_dense_attention_in_na_layout():
    q, k, v, _ = Problem(2, (3, 4), 2, 8, (2, 2), (1, 1), (False, False), False).tensors(dtype=torch.float64)
    got = sdpa_full(q, k, v, 2, scale=0.5)
    flat = [x.reshape(2, 12, 2, 8) for x in (q, k, v)]
    weights = (torch.einsum("bnhd,bmhd->bhnm", flat[0], flat[1]) * 0.5).softmax(-1)
    expected = torch.einsum("bhnm,bmhd->bnhd", weights, flat[2]).reshape(q.shape)
    torch.testing.assert_close(got, expected)
