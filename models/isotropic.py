"""Isotropic (ViT-like, single resolution) NAT / DiNAT and the ViT+RPB baseline.

16x16 patch embedding (conv + norm, no position embedding, no class token), ``depth`` pre-norm
blocks at 1/16 resolution, norm, average pool, linear head -- the authors' classification/
isotropic.py, with its key names (``layers.{i}``). NA blocks use the shared NA layer; DiNAT
alternates dilation 1 / ``dilation``; ViT+RPB uses global self-attention with a
``[heads, 2L-1, 2L-1]`` relative position bias (``L = img_size // patch_size``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._common import (
    NATModelBase, build_nat_model, check_global_pool, check_output_fmt, drop_path_rates, make_head,
    pretrained_cfg, to_output_fmt,
)
from .dinat_s import PatchEmbed
from .layers import GlobalAttentionRPB, NATLayer, init_weights, is_int, is_sequence

__all__ = ["NATIsotropic"]


class NATIsotropic(NATModelBase):
    """Isotropic transformer with neighborhood attention (``attention="na"``) or global attention + RPB.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0: no head, ``forward`` gives the pooled features).
        img_size: the training image side; sizes the global attention's bias table
            (``img_size // patch_size`` tokens per side).
        patch_size: side of the stem's patches (the map is at ``1 / patch_size`` resolution).
        embed_dim: channels of every block.
        depth: number of blocks.
        num_heads: attention heads per block.
        attention: ``"na"`` (neighborhood attention) or ``"global"`` (self-attention + RPB, ViT+RPB).
        kernel_size: the NA window (odd, >= 3); unused by global attention.
        dilations: one int >= 1 per block; None: every dilation 1.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout after the stem, the attention projections and in the MLPs.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over the blocks.
        layer_scale: None, or the initial per-channel scale of every residual branch.
        global_pool: ``"avg"`` (average over the map before the head) or ``""`` (no pooling).
        na_backend: the ``kernels.na2d`` backend (``"auto"`` picks one for the device).
        norm_layer: the norm used throughout, called as ``norm_layer(embed_dim)``.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            img_size: int = 224,
            patch_size: int = 16,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 12,
            attention: str = "na",
            kernel_size: int = 7,
            dilations: Optional[Sequence[int]] = None,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            layer_scale: Optional[float] = None,
            global_pool: str = "avg",
            na_backend: str = "auto",
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if attention not in ("na", "global"):
            raise ValueError(f"attention must be 'na' (neighborhood) or 'global' (self-attention + RPB); got {attention!r}")
        check_global_pool(global_pool)
        if dilations is None:
            dilations = [1] * depth
        if not is_sequence(dilations) or len(dilations) != depth or not all(is_int(d, 1) for d in dilations):
            raise ValueError(f"dilations must hold one int >= 1 per block (depth {depth}); got {dilations!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer, **dd)
        self.pos_drop = nn.Dropout(p=drop_rate)
        (dpr,) = drop_path_rates(drop_path_rate, (depth,))
        blocks = []
        for i in range(depth):
            attn = None
            if attention == "global":
                attn = GlobalAttentionRPB(embed_dim, num_heads, img_size // patch_size, qkv_bias=qkv_bias,
                                          attn_drop=attn_drop_rate, proj_drop=drop_rate, **dd)
            blocks.append(NATLayer(
                embed_dim, num_heads, kernel_size, dilations[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], layer_scale=layer_scale,
                norm_layer=norm_layer, na_backend=na_backend, attn=attn, **dd,
            ))
        self.layers = nn.Sequential(*blocks)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head = make_head(embed_dim, num_classes, **dd)
        self.apply(init_weights)

    # --- timm model interface (the rest is NATModelBase's) ---------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs as NCHW (default) or NHWC maps; ``norm`` applies the final norm to each."""
        check_output_fmt(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        blocks = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[:max_index + 1]
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm else x
                intermediates.append(to_output_fmt(x_inter, output_fmt))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layers, x)
        else:
            x = self.layers(x)
        return self.norm(x)


_URL = "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/isotropic/"
_PAPER = dict(paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer",
              first_conv="patch_embed.proj", reduction=16)

default_cfgs = generate_default_cfgs({
    "nat_isotropic_small.in1k": pretrained_cfg(_URL + "nat_isotropic_small_in1k_224.pth", **_PAPER),
    "dinat_isotropic_small.in1k": pretrained_cfg(_URL + "dinat_isotropic_small_in1k_224.pth", **_PAPER),
    "vitrpb_small.in1k": pretrained_cfg(_URL + "vitrpb_small_in1k_224.pth", **_PAPER),
    "nat_isotropic_base.in1k": pretrained_cfg(_URL + "nat_isotropic_base_in1k_224.pth", **_PAPER),
    "dinat_isotropic_base.in1k": pretrained_cfg(_URL + "dinat_isotropic_base_in1k_224.pth", **_PAPER),
    "vitrpb_base.in1k": pretrained_cfg(_URL + "vitrpb_base_in1k_224.pth", **_PAPER),
})

# The authors' isotropic registry: ViT-S/B sizes at patch 16, kernel 7; DiNAT alternates dilation 1 and 2.

@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    model_args = dict(embed_dim=384, depth=12, num_heads=12, kernel_size=7, mlp_ratio=4.0, drop_path_rate=0.1)
    return build_nat_model(NATIsotropic, "nat_isotropic_small", pretrained, dict(model_args, **kwargs))


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    model_args = dict(embed_dim=384, depth=12, num_heads=12, kernel_size=7, mlp_ratio=4.0, drop_path_rate=0.1)
    return build_nat_model(NATIsotropic, "dinat_isotropic_small", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(2,))


@register_model
def vitrpb_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    model_args = dict(embed_dim=384, depth=12, num_heads=12, attention="global", mlp_ratio=4.0, drop_path_rate=0.1)
    return build_nat_model(NATIsotropic, "vitrpb_small", pretrained, dict(model_args, **kwargs))


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    model_args = dict(embed_dim=768, depth=12, num_heads=24, kernel_size=7, mlp_ratio=4.0, drop_path_rate=0.4)
    return build_nat_model(NATIsotropic, "nat_isotropic_base", pretrained, dict(model_args, **kwargs))


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    model_args = dict(embed_dim=768, depth=12, num_heads=24, kernel_size=7, mlp_ratio=4.0, drop_path_rate=0.4)
    return build_nat_model(NATIsotropic, "dinat_isotropic_base", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(2,))


@register_model
def vitrpb_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    model_args = dict(embed_dim=768, depth=12, num_heads=24, attention="global", mlp_ratio=4.0, drop_path_rate=0.4)
    return build_nat_model(NATIsotropic, "vitrpb_base", pretrained, dict(model_args, **kwargs))
