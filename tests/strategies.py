"""Hypothesis strategies for NA problems, shared by the reference and kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass(frozen=True)
class Problem:
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    use_rpb: bool

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    def tensors(self, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
        """Random q, k, v (and rpb or None), drawn from a seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch, *self.spatial, self.heads, self.head_dim)
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
        rpb = None
        if self.use_rpb:
            rpb = torch.randn(self.heads, *(2 * k_ - 1 for k_ in self.kernel_size), generator=gen, dtype=torch.float64)
        out = [x.to(device=device, dtype=dtype).requires_grad_(requires_grad) if x is not None else None
               for x in (q, k, v, rpb)]
        return out


@st.composite
def problems(draw, ndims=(1, 2, 3), max_kernel=(7, 5, 3), max_dilation=(4, 3, 2), max_tokens=256,
             head_dims=st.integers(1, 8), allow_causal=True, rpb=None):
    """NA problems small enough for dense brute force (at most ``max_tokens`` tokens)."""
    ndim = draw(st.sampled_from(ndims))
    kernel_size, dilation, spatial, causal = [], [], [], []
    budget = max_tokens
    for axis in range(ndim):
        axes_left = ndim - axis
        k = draw(st.integers(2, max_kernel[ndim - 1]))
        d = draw(st.integers(1, max_dilation[ndim - 1]))
        # Keep the remaining axes room for at least 2 tokens each.
        cap = max(2, int(budget / (2 ** (axes_left - 1))))
        while k * d > cap and d > 1:
            d -= 1
        while k * d > cap and k > 2:
            k -= 1
        length = draw(st.integers(k * d, max(k * d, min(cap, k * d + 2 * d + 3))))
        budget = max(2, budget // length)
        kernel_size.append(k)
        dilation.append(d)
        spatial.append(length)
        causal.append(draw(st.booleans()) if allow_causal else False)
    rpb_ok = all(k % 2 == 1 for k in kernel_size) and not any(causal)
    use_rpb = rpb_ok and (draw(st.booleans()) if rpb is None else rpb)
    return Problem(
        batch=draw(st.integers(1, 2)),
        spatial=tuple(spatial),
        heads=draw(st.integers(1, 2)),
        head_dim=draw(head_dims),
        kernel_size=tuple(kernel_size),
        dilation=tuple(dilation),
        is_causal=tuple(causal),
        use_rpb=use_rpb,
    )


def num_tokens(p: Problem) -> int:
    return math.prod(p.spatial)
