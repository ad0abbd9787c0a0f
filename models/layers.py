"""Building blocks shared by every model family: the NA attention layer and the transformer block.

Tensors are channels-last, ``[B, H, W, C]``, end to end (as in the original DiNAT code), so the
heads-last layout of ``kernels.na2d`` is a free reshape of the qkv projection.
"""

import functools
import numbers
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath, Mlp, register_notrace_function, register_notrace_module, resize_rel_pos_bias_table_simple, trunc_normal_,
)

from dinat import kernels

__all__ = [
    "NeighborhoodAttention2d",
    "GlobalAttentionRPB",
    "NATLayer",
    "per_level",
    "is_sequence",
    "is_int",
    "check_dilations",
    "init_weights",
    "pad_to_multiple",
]


def is_sequence(value) -> bool:
    """A list-like argument (also Hydra/OmegaConf ListConfig), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def is_int(value, minimum: int) -> bool:
    """An int (not a bool) >= ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def per_level(name: str, value, num_levels: int) -> tuple:
    """One value for every level: an int broadcasts, a sequence must have one entry per level."""
    if is_sequence(value):
        if len(value) != num_levels:
            raise ValueError(f"{name} must be one value or one per level ({num_levels}); got {value!r}")
        return tuple(value)
    return (value,) * num_levels


def check_dilations(dilations, depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Validate ``dilations`` (None, or one list per level with one int >= 1 per block)."""
    if dilations is None:
        return tuple((1,) * d for d in depths)
    if not is_sequence(dilations) or len(dilations) != len(depths):
        raise ValueError(
            f"dilations must be None or one list per level ({len(depths)} levels, depths={tuple(depths)}); "
            f"got {dilations!r}"
        )
    out = []
    for level, (dils, depth) in enumerate(zip(dilations, depths)):
        if not is_sequence(dils) or len(dils) != depth:
            raise ValueError(
                f"dilations[{level}] must hold one int per block of level {level} (depth {depth}); got {dils!r}"
            )
        for d in dils:
            if not is_int(d, 1):
                raise ValueError(f"dilations[{level}] must hold ints >= 1; got {dils!r}")
        out.append(tuple(int(d) for d in dils))
    return tuple(out)


def _check_heads(dim: int, num_heads: int) -> int:
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"num_heads must divide the channel count: dim={dim}, num_heads={num_heads}")
    return dim // num_heads


def _rpb_table(num_heads: int, size: int, device=None, dtype=None) -> nn.Parameter:
    """A ``[heads, 2 * size - 1, 2 * size - 1]`` relative position bias table, trunc-normal(0.02) init."""
    rpb = nn.Parameter(torch.zeros(num_heads, 2 * size - 1, 2 * size - 1, device=device, dtype=dtype))
    trunc_normal_(rpb, std=0.02)
    return rpb


# FX: how much to pad depends on the traced input's size, so timm's tracer keeps this call whole.
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int, channels_last: bool) -> torch.Tensor:
    """Zero-pad the bottom and right of an NHWC (``channels_last``) or NCHW map to multiples of ``multiple``."""
    if channels_last:
        height, width = x.shape[1], x.shape[2]
    else:
        height, width = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [0, 0, 0, pad_w, 0, pad_h] if channels_last else [0, pad_w, 0, pad_h])


# FX (timm's tracer) keeps the attention layers as leaves: their padding and bias lookup depend on
# the map size. TorchScript compiles them, calling back into Python only for the kernels' dispatch.
@register_notrace_module
class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2-D (dilated) neighborhood attention with relative position bias.

    qkv Linear -> ``kernels.na2d`` (softmax(q.k * scale + rpb) v over a ``kernel_size`` window
    with ``dilation``) -> proj Linear. A feature map smaller than ``kernel_size * dilation`` on an
    axis is zero-padded at the right/bottom up to that size and the output cropped back, as in the
    original implementation (so tiny inputs still run; padded tokens do act as keys there).

    Args:
        dim: channels in and out (``num_heads * head_dim``).
        num_heads: attention heads; must divide ``dim``.
        kernel_size: the window side, an odd int >= 3.
        dilation: the window's dilation, an int >= 1.
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on the attention weights (uses the unfused ``na2d_qk`` / ``na2d_av`` ops
            while training, since dropout needs the weights).
        proj_drop: dropout after the output projection.
        backend: the ``kernels.na2d`` backend (``"auto"`` picks one for the device).
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.head_dim = _check_heads(dim, num_heads)
        if not is_int(kernel_size, 3) or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 3 (the rpb needs a centre); got {kernel_size!r}")
        if not is_int(dilation, 1):
            raise ValueError(f"dilation must be an int >= 1; got {dilation!r}")
        self.num_heads = num_heads
        self.kernel_size = int(kernel_size)
        self.dilation = int(dilation)
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.rpb = _rpb_table(num_heads, self.kernel_size, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_b, pad_r = max(0, window - H), max(0, window - W)
        if pad_b or pad_r:
            x = F.pad(x, [0, 0, 0, pad_r, 0, pad_b])
        Hp, Wp = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = self.attend(q, k, v).reshape(B, Hp, Wp, C)
        if pad_b or pad_r:
            x = x[:, :H, :W, :]
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore  # the kernels' argument checks and backend dispatch are Python, not TorchScript
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Heads-last ``[B, H, W, heads, head_dim]`` q, k, v -> the attention output, same layout."""
        if self.training and self.attn_drop.p > 0:
            # Dropout on the attention weights needs them materialised: the unfused qk / av ops.
            attn = kernels.na2d_qk(q * self.scale, k, self.kernel_size, self.dilation, rpb=self.rpb,
                                   backend=self.backend)
            attn = self.attn_drop(attn.softmax(dim=-1))
            return kernels.na2d_av(attn, v, self.kernel_size, self.dilation, backend=self.backend)
        return kernels.na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale,
                            backend=self.backend)


@functools.lru_cache(maxsize=32)
def _global_rpb_index(height: int, width: int, table_size: int) -> torch.Tensor:
    """Flat index into a ``[2L-1, 2L-1]`` bias table for every (query, key) pair of an H x W map.

    Offsets are key minus query, shifted by ``L - 1`` (the NA convention, and the original code's
    flipped Swin index).
    """
    # Explicitly on the CPU: the cache must not capture tensors made under a default-device context.
    ys, xs = torch.meshgrid(torch.arange(height, device="cpu"), torch.arange(width, device="cpu"), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None] + table_size - 1
    dx = xs[None, :] - xs[:, None] + table_size - 1
    return dy * (2 * table_size - 1) + dx


@register_notrace_module  # FX: see NeighborhoodAttention2d
class GlobalAttentionRPB(nn.Module):
    """Plain multi-head self-attention over the whole map with a 2-D relative position bias.

    The bias table ``rpb`` is ``[heads, 2L-1, 2L-1]`` for maps up to ``L x L`` (``input_size``);
    it is gathered into an additive ``[heads, N, N]`` mask for ``scaled_dot_product_attention``.
    Larger maps use the table resized bicubically to cover them.

    Args:
        dim: channels in and out (``num_heads * head_dim``).
        num_heads: attention heads; must divide ``dim``.
        input_size: ``L``, the largest map side the bias table covers unresized.
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, dim: int, num_heads: int, input_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.head_dim = _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.input_size = int(input_size)
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.rpb = _rpb_table(num_heads, self.input_size, **dd)
        self.attn_drop_p = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, input_size={self.input_size}"

    @torch.jit.ignore  # TorchScript: the index table is cached by a Python lru_cache
    def relative_bias(self, height: int, width: int) -> torch.Tensor:
        """The ``[heads, N, N]`` additive bias for an ``height x width`` map (``N = height * width``)."""
        table, size = self.rpb, self.input_size
        if height > size or width > size:
            # A map larger than the table was trained for: resize the table bicubically to cover it
            # (the same resampling the authors used to move RPBs to a new kernel size).
            size = max(height, width)
            table = resize_rel_pos_bias_table_simple(self.rpb, (size, size), (self.num_heads, 2 * size - 1, 2 * size - 1))
        index = _global_rpb_index(height, width, size).to(table.device)
        return table.reshape(self.num_heads, -1)[:, index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        bias = self.relative_bias(H, W).to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=self.attn_drop_p if self.training else 0.0,
            scale=self.scale,
        )
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))


class NATLayer(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))`` then the same with the MLP.

    With ``layer_scale`` (a float) both branches are scaled by learned per-channel ``gamma1`` /
    ``gamma2`` (initialised to ``layer_scale``). ``attn`` defaults to neighborhood attention.

    Args:
        dim: channels in and out.
        num_heads: attention heads of the default attention.
        kernel_size: window side of the default (neighborhood) attention.
        dilation: dilation of the default attention.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: bias in the default attention's qkv projection.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the default attention's weights.
        drop_path: stochastic-depth rate of both residual branches.
        layer_scale: None, or the initial value of the per-channel branch scales (a float).
        norm_layer: the two pre-norms, called as ``norm_layer(dim)``.
        act_layer: the MLP's activation.
        na_backend: the default attention's ``kernels.na2d`` backend.
        attn: an attention module to use instead of ``NeighborhoodAttention2d`` (e.g. ``GlobalAttentionRPB``).
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: Optional[float] = None,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, na_backend: str = "auto",
                 attn: Optional[nn.Module] = None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn if attn is not None else NeighborhoodAttention2d(
            dim, num_heads, kernel_size, dilation, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
            backend=na_backend, **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            if isinstance(layer_scale, bool) or not isinstance(layer_scale, numbers.Real):
                raise TypeError(f"layer_scale must be None or a float; got {layer_scale!r}")
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            # None parameters (not in the state dict) keep both branches of forward() scriptable.
            self.register_parameter("gamma1", None)
            self.register_parameter("gamma2", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma1, gamma2 = self.gamma1, self.gamma2
        if gamma1 is not None and gamma2 is not None:
            x = x + self.drop_path1(gamma1 * self.attn(self.norm1(x)))
            return x + self.drop_path2(gamma2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """The original init: Linear trunc-normal(0.02) with zero bias, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
