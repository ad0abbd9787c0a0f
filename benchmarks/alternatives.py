"""What neighborhood attention is compared against.

Each alternative takes heads-last ``q, k, v`` ``[B, *spatial, H, D]`` plus the NA arguments
(``kernel_size, dilation, is_causal, rpb, scale``) and returns ``[B, *spatial, H, D]``:

* FlexAttention NA (``flex_na`` / ``FlexNA``): PyTorch's ``flex_attention`` with a ``mask_mod`` that
  keeps exactly the NA window and a ``score_mod`` that adds the relative position bias. It computes
  the same function as ``kernels.naXd``. The window comes from ``kernels.geometry``'s per-axis tables
  (window start, slot validity, RPB index), so the rule is not written a second time here. On a GPU
  it is run through ``torch.compile``, which generates a block-sparse Triton kernel: the strongest
  Triton-based alternative. On CPU it runs eagerly (dense scores, masked), which is only good for
  correctness checks.
* Full attention (``sdpa_full``): ``scaled_dot_product_attention`` over all tokens, the quadratic
  cost NA avoids. It ignores the window, causality and RPB, so it is *not* the same function: time
  it, never compare its output.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from dinat.kernels.api import check_params
from dinat.kernels.geometry import NAParams, axis_tables, axis_window

__all__ = ["FlexNA", "flex_na", "sdpa_full"]


def _to_bhnd(x: torch.Tensor) -> torch.Tensor:
    """[B, *spatial, H, D] -> [B, H, N, D] (the layout flex_attention and SDPA take)."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).transpose(1, 2)


def _from_bhnd(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(like.shape)


class _AxisLookup:
    """One spatial axis: the geometry tables as device tensors, and how to read them from flat indices."""

    def __init__(self, length: int, stride: int, kernel_size: int, dilation: int, is_causal: bool, device):
        self.length, self.stride = length, stride
        self.kernel_size, self.dilation, self.is_causal = kernel_size, dilation, is_causal
        _, valid, rpb_bin = axis_window(length, kernel_size, dilation, is_causal, device)
        self.window_start = axis_tables(length, kernel_size, dilation, is_causal, device).window_start.long()
        self.slot_valid = valid if is_causal else None  # [L, k]; every slot counts when non-causal
        self.rpb_bin = rpb_bin  # [L, k], into this axis' 2k-1 biases

    def slot(self, q_idx, kv_idx):
        """Query coordinate, key's window slot (may lie outside [0, k)) and whether the key is in the window."""
        i = (q_idx // self.stride) % self.length
        j = (kv_idx // self.stride) % self.length
        offset = j - self.window_start[i]  # window holds start + t * dilation, t in [0, k)
        slot = offset // self.dilation
        inside = (offset >= 0) & (offset % self.dilation == 0) & (slot < self.kernel_size)
        return i, slot, inside

    def clamped(self, slot):
        # mask_mod/score_mod see every (query, key) pair, masked ones too: keep table reads in bounds.
        return slot.clamp(0, self.kernel_size - 1)


class FlexNA:
    """Dilated/causal NA with RPB as a FlexAttention call, for one spatial shape and NA setting.

    The block mask is built once here (as the NA kernels cache their geometry tables), so calling
    the object times only the attention itself.
    """

    def __init__(self, spatial: Sequence[int], kernel_size, dilation=1, is_causal=False, device="cpu",
                 compile: Optional[bool] = None, block_size: int = 128):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        device = torch.device(device)
        self.spatial = tuple(int(s) for s in spatial)
        self.params: NAParams = check_params(self.spatial, kernel_size, dilation, is_causal, "flex_na")
        self.compiled = device.type == "cuda" if compile is None else bool(compile)
        strides = [math.prod(self.spatial[a + 1:]) for a in range(len(self.spatial))]
        self.axes = [
            _AxisLookup(length, stride, k, d, c, device)
            for length, stride, k, d, c in zip(self.spatial, strides, self.params.kernel_size,
                                               self.params.dilation, self.params.is_causal)
        ]
        n = math.prod(self.spatial)
        self.block_mask = create_block_mask(self._mask_mod(), None, None, n, n, device=device,
                                            BLOCK_SIZE=block_size, _compile=self.compiled)
        self._attention = torch.compile(flex_attention, dynamic=False) if self.compiled else flex_attention
        self._score_mod_rpb: Optional[torch.Tensor] = None
        self._score_mod: Optional[Callable] = None

    def computed_block_fraction(self) -> float:
        """Fraction of the (query block, key block) tiles FlexAttention computes for this mask."""
        return 1.0 - float(self.block_mask.sparsity()) / 100.0

    def _mask_mod(self) -> Callable:
        axes = self.axes  # a plain function, not a bound method: create_block_mask checks its arity

        def in_window(b, h, q_idx, kv_idx):
            keep = None
            for axis in axes:
                i, slot, inside = axis.slot(q_idx, kv_idx)
                if axis.slot_valid is not None:
                    inside = inside & axis.slot_valid[i, axis.clamped(slot)]
                keep = inside if keep is None else keep & inside
            return keep

        return in_window

    def _score_mod_for(self, rpb: torch.Tensor) -> Callable:
        axes = self.axes

        def add_rpb(score, b, h, q_idx, kv_idx):
            # Index rpb [H, 2k-1, ...] per axis, not a reshaped view: the captured tensor stays the
            # leaf whose gradient FlexAttention's backward scatters into.
            index = []
            for axis in axes:
                i, slot, _ = axis.slot(q_idx, kv_idx)
                index.append(axis.rpb_bin[i, axis.clamped(slot)])
            return score + rpb[(h, *index)]

        return add_rpb

    def __call__(self, q, k, v, rpb=None, scale=None):
        if tuple(q.shape[1:-2]) != self.spatial:
            raise ValueError(f"FlexNA built for spatial {self.spatial}; got q of shape {tuple(q.shape)}")
        if rpb is not None and self.params.any_causal:
            raise ValueError("flex_na: rpb is not defined for causal attention")
        score_mod = None
        if rpb is not None:
            # Reuse the score_mod while the bias tensor is the same: a compiled flex_attention
            # would recompile for every new function object.
            if self._score_mod_rpb is not rpb:
                self._score_mod_rpb, self._score_mod = rpb, self._score_mod_for(rpb)
            score_mod = self._score_mod
        with warnings.catch_warnings():
            # Eager flex_attention warns that it materialises the scores; on CPU that is intended.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = self._attention(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v), score_mod=score_mod,
                                  block_mask=self.block_mask, scale=scale)
        return _from_bhnd(out, q)


def flex_na(q, k, v, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, compile=None):
    """One-shot FlexAttention NA (builds the block mask every call; use ``FlexNA`` to reuse it)."""
    return FlexNA(q.shape[1:-2], kernel_size, dilation, is_causal, q.device, compile)(q, k, v, rpb, scale)


def sdpa_full(q, k, v, kernel_size=None, dilation=1, is_causal=False, rpb=None, scale=None):
    """Full (all-token) attention with SDPA. NA arguments are accepted and ignored: a different function."""
    out = F.scaled_dot_product_attention(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v), scale=scale)
    return _from_bhnd(out, q)
