"""DiNAT_s: DiNAT on a Swin-like skeleton (the authors' "alternative model", classification/dinats.py).

A non-overlapping 4x4 patch embedding and Swin's patch merging replace NAT's overlapping conv
tokenizer and downsampler; blocks are the shared NA transformer layer. Key names follow the
authors' code (``layers.{i}.blocks.{j}``, ``layers.{i}.downsample.{norm,reduction}``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._common import build_nat_model, pretrained_cfg
from .dinat import HierarchicalNAT
from .layers import pad_to_multiple

__all__ = ["PatchEmbed", "PatchMerging", "DiNATs"]


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv -> channels-last -> norm; pads the input up to a multiple.

    Args:
        patch_size: side of a patch (the convolution's kernel and stride).
        in_chans: image channels.
        embed_dim: output channels.
        norm_layer: the norm applied to the tokens, called as ``norm_layer(embed_dim)``.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm_layer=nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device,
                              dtype=dtype)
        self.norm = norm_layer(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, self.patch_size, channels_last=False)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging: concatenate each 2x2 neighbourhood (4C), norm, Linear(4C, 2C).

    Args:
        dim: input channels ``C`` (the output has ``2 * C``).
        norm_layer: the norm on the concatenation, called as ``norm_layer(4 * dim)``.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        self.norm = norm_layer(4 * dim, device=device, dtype=dtype)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2, channels_last=True)  # odd maps get a zero row/column, as in Swin
        # Channel order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (the checkpoints' order).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class DiNATs(HierarchicalNAT):
    """DiNAT on Swin's skeleton: 4x4 patch embedding, patch merging between levels.

    Args: as ``HierarchicalNAT`` (MLP ratio 4 unless given). State-dict keys follow the authors' code
    (``layers.{i}.blocks.{j}``, ``layers.{i}.downsample``).
    """

    levels_attr = "layers"
    default_mlp_ratio = 4.0

    def _make_stem(self, in_chans, embed_dim, norm_layer, **dd) -> nn.Module:
        return PatchEmbed(4, in_chans, embed_dim, norm_layer, **dd)

    def _make_downsample(self, dim, norm_layer, **dd) -> nn.Module:
        return PatchMerging(dim, norm_layer, **dd)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for level in self.layers:  # by name, not get_levels(): TorchScript cannot look an attribute up
            x = level(x)
        return self.norm(x)


_URL = "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
_PAPER = dict(paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer",
              first_conv="patch_embed.proj")

default_cfgs = generate_default_cfgs({
    "dinat_s_tiny.in1k": pretrained_cfg(_URL + "dinat_s_tiny_in1k_224.pth", **_PAPER),
    "dinat_s_small.in1k": pretrained_cfg(_URL + "dinat_s_small_in1k_224.pth", **_PAPER),
    "dinat_s_base.in1k": pretrained_cfg(_URL + "dinat_s_base_in1k_224.pth", **_PAPER),
    "dinat_s_large.in22k_ft_in1k": pretrained_cfg(_URL + "dinat_s_large_in1k_224.pth", **_PAPER),
    "dinat_s_large_384.in22k_ft_in1k": pretrained_cfg(_URL + "dinat_s_large_in1k_384.pth", input_size=(3, 384, 384),
                                            crop_pct=1.0, **_PAPER),
})


# The authors' DiNAT_s registry: Swin-T/S/B/L sizes, kernel 7, DiNAT's dilations (see models/dinat.py).

@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> DiNATs:
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), kernel_size=7, mlp_ratio=4.0,
                      drop_path_rate=0.2)
    return build_nat_model(DiNATs, "dinat_s_tiny", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> DiNATs:
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), kernel_size=7, mlp_ratio=4.0,
                      drop_path_rate=0.3)
    return build_nat_model(DiNATs, "dinat_s_small", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> DiNATs:
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), kernel_size=7, mlp_ratio=4.0,
                      drop_path_rate=0.5)
    return build_nat_model(DiNATs, "dinat_s_base", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs) -> DiNATs:
    model_args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), kernel_size=7, mlp_ratio=4.0,
                      drop_path_rate=0.35)
    return build_nat_model(DiNATs, "dinat_s_large", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs) -> DiNATs:
    model_args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), kernel_size=7, mlp_ratio=4.0,
                      drop_path_rate=0.35)
    return build_nat_model(DiNATs, "dinat_s_large_384", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(13, 6, 3, 1))
