"""An independent brute force of (dilated, causal) neighborhood attention, for the tests only.

Written from the rules in words, scalar Python per query, without ``kernels.geometry``:
a dense attention over all tokens with an explicit boolean mask and a dense bias.
"""

from __future__ import annotations

import itertools
import math

import torch


def axis_slots(i: int, length: int, k: int, d: int, causal: bool) -> list[tuple[int, bool, int]]:
    """(token index, takes part, rpb index) of the k window slots of query i along one axis."""
    group, ip = i % d, i // d
    sub_len = math.ceil((length - group) / d)
    if causal:
        start = max(ip - k + 1, 0)
    else:
        # Centre the window on the query, then slide it inward until it fits in the sub-grid.
        start = min(max(ip - k // 2, 0), sub_len - k)
    slots = []
    for t in range(k):
        jp = start + t
        takes_part = (jp <= ip and ip - jp < k) if causal else True
        slots.append((jp * d + group, takes_part, jp - ip + k - 1))
    return slots


def window(query_pos, spatial, kernel_size, dilation, causal):
    """Row-major list of (flat key index, takes part, rpb multi-index) for one query."""
    per_axis = [axis_slots(i, L, k, d, c) for i, L, k, d, c in zip(query_pos, spatial, kernel_size, dilation, causal)]
    out = []
    for combo in itertools.product(*per_axis):
        flat = 0
        for (j, _, _), L in zip(combo, spatial):
            flat = flat * L + j
        out.append((flat, all(c[1] for c in combo), tuple(c[2] for c in combo)))
    return out


def mask_and_bias(spatial, kernel_size, dilation, causal, rpb=None):
    """Dense ``[N, N]`` boolean mask and ``[H, N, N]`` bias (zeros where masked)."""
    N = math.prod(spatial)
    mask = torch.zeros(N, N, dtype=torch.bool)
    heads = rpb.shape[0] if rpb is not None else 1
    bias_index = {}
    for n, pos in enumerate(itertools.product(*(range(L) for L in spatial))):
        for flat, takes_part, rel in window(pos, spatial, kernel_size, dilation, causal):
            if takes_part:
                assert not mask[n, flat], "a key appears twice in one window"
                mask[n, flat] = True
                bias_index[(n, flat)] = rel
    bias = None
    if rpb is not None:
        rows, cols = zip(*bias_index)
        rels = list(zip(*bias_index.values()))
        bias = torch.zeros(heads, N, N, dtype=rpb.dtype)
        bias = bias.index_put((torch.arange(heads)[:, None], torch.tensor(rows), torch.tensor(cols)),
                              rpb[(slice(None), *[torch.tensor(r) for r in rels])])
    return mask, bias


def dense_na(q, k, v, kernel_size, dilation, causal, rpb=None, scale=None, return_lse=False):
    """Dense masked attention on heads-last tensors; differentiable in q, k, v and rpb."""
    B, *spatial, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    mask, bias = mask_and_bias(spatial, kernel_size, dilation, causal, rpb)
    qf, kf, vf = (x.reshape(B, -1, H, x.shape[-1]).transpose(1, 2) for x in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = (torch.softmax(scores, -1) @ vf).transpose(1, 2).reshape(v.shape)
    if return_lse:
        return out, lse.transpose(1, 2).reshape(q.shape[:-1])
    return out


def window_logits(q, k, kernel_size, dilation, causal, rpb=None):
    """Unscaled ``q.k (+rpb)`` in window-slot order, ``-inf`` on slots that do not take part."""
    B, *spatial, H, D = q.shape
    K = math.prod(kernel_size)
    qf, kf = q.reshape(B, -1, H, D), k.reshape(B, -1, H, D)
    out = torch.empty(B, qf.shape[1], H, K, dtype=q.dtype)
    for n, pos in enumerate(itertools.product(*(range(L) for L in spatial))):
        for t, (flat, takes_part, rel) in enumerate(window(pos, spatial, kernel_size, dilation, causal)):
            if not takes_part:
                out[:, n, :, t] = float("-inf")
                continue
            val = (qf[:, n] * kf[:, flat]).sum(-1)
            if rpb is not None:
                val = val + rpb[(slice(None), *rel)]
            out[:, n, :, t] = val
    return out.reshape(B, *spatial, H, K)
