"""NAT and DiNAT: hierarchical (dilated) neighborhood attention transformers.

Architecture and state-dict key names follow the authors' code (SHI-Labs/Neighborhood-Attention-
Transformer, classification/nat.py and dinat.py), so their checkpoints load without remapping;
Hugging Face ``DinatForImageClassification`` / ``NatForImageClassification`` checkpoints are
converted by ``checkpoint_filter_fn``.

Papers: NAT https://arxiv.org/abs/2204.07143, DiNAT https://arxiv.org/abs/2209.15001.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._checkpoint import checkpoint_filter_fn
from ._common import (
    NATModelBase, build_nat_model, check_global_pool, check_output_fmt, drop_path_rates, make_head,
    pretrained_cfg, to_output_fmt,
)
from .layers import NATLayer, check_dilations, init_weights, per_level

__all__ = ["ConvTokenizer", "ConvDownsampler", "NATLevel", "HierarchicalNAT", "DiNAT", "checkpoint_filter_fn"]


class ConvTokenizer(nn.Module):
    """Two overlapping 3x3 stride-2 convolutions (no activation between) -> channels-last -> norm.

    NCHW image in, NHWC tokens at 1/4 resolution out.

    Args:
        in_chans: image channels.
        embed_dim: output channels (the first convolution gives half of them).
        norm_layer: the norm applied to the tokens, called as ``norm_layer(embed_dim)``.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """Overlapping 3x3 stride-2 convolution doubling the channels, then norm (channels-last in/out).

    Args:
        dim: input channels (the output has ``2 * dim``).
        norm_layer: the norm after the convolution, called as ``norm_layer(2 * dim)``.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False, device=device,
                                   dtype=dtype)
        self.norm = norm_layer(2 * dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATLevel(nn.Module):
    """One resolution level: ``blocks`` (NA transformer layers), then an optional ``downsample``.

    Args:
        dim: channels of the level's tokens.
        depth: number of blocks.
        num_heads: attention heads per block.
        kernel_size: the NA window (odd, >= 3).
        dilations: one dilation per block.
        downsample: applied after the blocks (None for the last level).
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: bias in the qkv projection.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: one stochastic-depth rate per block.
        layer_scale: None, or the initial per-channel scale of both residual branches.
        norm_layer: the blocks' norm.
        na_backend: the ``kernels.na2d`` backend (``"auto"`` picks one for the device).
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int, dilations: Sequence[int],
                 downsample: Optional[nn.Module], mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: Sequence[float], layer_scale: Optional[float], norm_layer, na_backend: str,
                 device=None, dtype=None):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            NATLayer(dim, num_heads, kernel_size, dilations[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                     attn_drop=attn_drop, drop_path=drop_path[i], layer_scale=layer_scale, norm_layer=norm_layer,
                     na_backend=na_backend, device=device, dtype=dtype)
            for i in range(depth)
        ])
        self.downsample = downsample

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class HierarchicalNAT(NATModelBase):
    """Four-level NA transformer; subclasses choose the stem, the downsampler and the level container name.

    Features stay channels-last (NHWC) throughout; ``forward_features`` returns the normed last map.
    Level ``i`` has ``embed_dim * 2**i`` channels; a downsampler halves the map after every level but
    the last.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0: no head, ``forward`` gives the pooled features).
        embed_dim: channels of the first level.
        depths: blocks per level (its length is the number of levels).
        num_heads: attention heads, one for every level or one per level.
        kernel_size: the NA window (odd, >= 3), one for every level or one per level.
        dilations: one list per level with one int >= 1 per block; None: every dilation 1 (NAT).
        mlp_ratio: MLP hidden width over the block's channels; None: the family's default
            (``default_mlp_ratio``).
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout after the stem, the attention projections and in the MLPs.
        attn_drop_rate: dropout on the attention weights (needs a backend with the unfused ops).
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over all blocks.
        layer_scale: None, or the initial per-channel scale of every residual branch (e.g. 1e-5).
        global_pool: ``"avg"`` (average over the map before the head) or ``""`` (no pooling).
        na_backend: the ``kernels.na2d`` backend (``"auto"`` picks one for the device).
        norm_layer: the norm used throughout, called as ``norm_layer(channels)``.
        device: where the parameters are created (e.g. ``"meta"``).
        dtype: the parameters' dtype.
    """

    levels_attr = "levels"  # state-dict name of the level list in the authors' code
    default_mlp_ratio = 3.0

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            kernel_size: Union[int, Sequence[int]] = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            mlp_ratio: Optional[float] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.2,
            layer_scale: Optional[float] = None,
            global_pool: str = "avg",
            na_backend: str = "auto",
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_global_pool(global_pool)
        depths = tuple(depths)
        num_levels = len(depths)
        if num_levels < 1 or any(d < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty sequence of ints >= 1; got {depths!r}")
        num_heads = per_level("num_heads", num_heads, num_levels)
        kernel_sizes = per_level("kernel_size", kernel_size, num_levels)
        dilations = check_dilations(dilations, depths)
        mlp_ratio = self.default_mlp_ratio if mlp_ratio is None else mlp_ratio

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_levels - 1))
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = self._make_stem(in_chans, embed_dim, norm_layer, **dd)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = drop_path_rates(drop_path_rate, depths)
        levels = []
        self.feature_info = []
        reduction = self.stem_reduction
        for i in range(num_levels):
            dim = int(embed_dim * 2 ** i)
            levels.append(NATLevel(
                dim, depths[i], num_heads[i], kernel_sizes[i], dilations[i],
                downsample=self._make_downsample(dim, norm_layer, **dd) if i < num_levels - 1 else None,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i], layer_scale=layer_scale, norm_layer=norm_layer, na_backend=na_backend, **dd,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"{self.levels_attr}.{i}"))
            reduction *= 2
        setattr(self, self.levels_attr, nn.ModuleList(levels))
        self.norm = norm_layer(self.num_features, **dd)
        self.head = make_head(self.num_features, num_classes, **dd)
        self.apply(init_weights)

    def get_levels(self) -> nn.ModuleList:
        """The ``NATLevel`` modules in order, under whichever name the family stores them (``levels_attr``).

        Each has ``blocks`` (its ``NATLayer`` s, whose ``attn`` is the ``NeighborhoodAttention2d``) and
        ``downsample`` (None for the last level). Level ``i`` sees the image at
        ``1 / (stem_reduction * 2**i)`` resolution.

        Python only: TorchScript cannot look an attribute up by a string, so scripted methods
        (``forward_features``) name the list.
        """
        return getattr(self, self.levels_attr)

    # --- construction hooks -------------------------------------------------------------------
    stem_reduction = 4

    def _make_stem(self, in_chans, embed_dim, norm_layer, **dd) -> nn.Module:
        return ConvTokenizer(in_chans, embed_dim, norm_layer, **dd)

    def _make_downsample(self, dim, norm_layer, **dd) -> nn.Module:
        return ConvDownsampler(dim, norm_layer, **dd)

    # --- timm model interface (the rest is NATModelBase's) ---------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        name = self.levels_attr
        return dict(
            stem=r"^patch_embed",
            blocks=rf"^{name}\.(\d+)" if coarse else [
                (rf"^{name}\.(\d+)\.downsample", (99999,)),  # ends its level: joins the last block's group
                (rf"^{name}\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for level in self.get_levels():
            level.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Level outputs (before each downsampler) as NCHW (default) or NHWC maps.

        ``indices``: last n levels if an int, all if None, else those listed. ``norm`` applies the
        final norm to the last level's map (the only one it is sized for).
        """
        check_output_fmt(output_fmt)
        levels = self.get_levels()
        take_indices, max_index = feature_take_indices(len(levels), indices)
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        last = len(levels) - 1
        run = levels if torch.jit.is_scripting() or not stop_early else levels[:max_index + 1]
        for i, level in enumerate(run):
            x = level.forward_blocks(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last else x
                intermediates.append(to_output_fmt(x_inter, output_fmt))
            if level.downsample is not None and (i < last):
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the levels (and norm/head) that the requested intermediates do not need."""
        levels = self.get_levels()
        take_indices, max_index = feature_take_indices(len(levels), indices)
        kept = levels[:max_index + 1]
        kept[-1].downsample = None  # nothing consumes its output any more
        setattr(self, self.levels_attr, kept)
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm or max_index < len(levels) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        # The list by its name, not get_levels(): TorchScript cannot look an attribute up by a string.
        # A subclass with another levels_attr overrides this method.
        for level in self.levels:
            x = level(x)
        return self.norm(x)


class DiNAT(HierarchicalNAT):
    """NAT / DiNAT (NAT is DiNAT with every dilation 1): conv tokenizer, conv downsamplers.

    Args: as ``HierarchicalNAT`` (MLP ratio 3 unless given). State-dict keys follow the authors' code
    (``levels.{i}.blocks.{j}``, ``levels.{i}.downsample``).
    """


_DINAT_URL = "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
_NAT_URL = "https://shilab.cs.uoregon.edu/projects/nat/checkpoints/CLS/"
_DINAT_PAPER = dict(paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer")
_NAT_PAPER = dict(paper_ids="arXiv:2204.07143", paper_name="Neighborhood Attention Transformer")

# Published ImageNet-1k top-1 (and GMACs at the cfg's input size), recorded as notes.
default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": pretrained_cfg(_NAT_URL + "nat_mini.pth", "shi-labs/nat-mini-in1k-224", crop_pct=0.875,
                          notes=("top-1 81.8", "2.7 GMACs"), **_NAT_PAPER),
    "nat_tiny.in1k": pretrained_cfg(_NAT_URL + "nat_tiny.pth", "shi-labs/nat-tiny-in1k-224", crop_pct=0.875,
                          notes=("top-1 83.2", "4.3 GMACs"), **_NAT_PAPER),
    "nat_small.in1k": pretrained_cfg(_NAT_URL + "nat_small.pth", "shi-labs/nat-small-in1k-224", crop_pct=0.875,
                           notes=("top-1 83.7", "7.8 GMACs"), **_NAT_PAPER),
    "nat_base.in1k": pretrained_cfg(_NAT_URL + "nat_base.pth", "shi-labs/nat-base-in1k-224", crop_pct=0.875,
                          notes=("top-1 84.3", "13.7 GMACs"), **_NAT_PAPER),
    "dinat_mini.in1k": pretrained_cfg(_DINAT_URL + "dinat_mini_in1k_224.pth", "shi-labs/dinat-mini-in1k-224",
                            notes=("top-1 81.8", "2.7 GMACs"), **_DINAT_PAPER),
    "dinat_tiny.in1k": pretrained_cfg(_DINAT_URL + "dinat_tiny_in1k_224.pth", "shi-labs/dinat-tiny-in1k-224",
                            notes=("top-1 82.7", "4.3 GMACs"), **_DINAT_PAPER),
    "dinat_small.in1k": pretrained_cfg(_DINAT_URL + "dinat_small_in1k_224.pth", "shi-labs/dinat-small-in1k-224",
                             notes=("top-1 83.8", "7.8 GMACs"), **_DINAT_PAPER),
    "dinat_base.in1k": pretrained_cfg(_DINAT_URL + "dinat_base_in1k_224.pth", "shi-labs/dinat-base-in1k-224",
                            notes=("top-1 84.4", "13.7 GMACs"), **_DINAT_PAPER),
    "dinat_large.in22k_ft_in1k": pretrained_cfg(
        _DINAT_URL + "dinat_large_in22k_in1k_224.pth", "shi-labs/dinat-large-in22k-in1k-224",
        notes=("top-1 86.6",), **_DINAT_PAPER),
    "dinat_large_384.in22k_ft_in1k": pretrained_cfg(
        _DINAT_URL + "dinat_large_in22k_in1k_384.pth", "shi-labs/dinat-large-in22k-in1k-384",
        input_size=(3, 384, 384), crop_pct=1.0, notes=("top-1 87.4",), **_DINAT_PAPER),
    "dinat_large_384_11x11.in22k_ft_in1k": pretrained_cfg(
        _DINAT_URL + "dinat_large_in22k_in1k_384_11x11.pth", "shi-labs/dinat-large-11x11-in22k-in1k-384",
        input_size=(3, 384, 384), crop_pct=1.0, notes=("top-1 87.5",), **_DINAT_PAPER),
})


# Each variant's architecture, as the authors' registry gives it. DiNAT's ``sparse_dilations`` are
# one per level, alternated with dilation 1 block by block: (8, 4, 2, 1) at 224 px makes level i's
# sparse-global window (7 x dilation) span its whole 56 / 28 / 14 / 7 map; (13, 6, 3, 1) approximates
# the same at 384 px (96 / 7, 48 / 7, 24 / 7).

@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), kernel_size=7, mlp_ratio=3.0,
                      drop_path_rate=0.2)
    return build_nat_model(DiNAT, "nat_mini", pretrained, dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), kernel_size=7, mlp_ratio=3.0,
                      drop_path_rate=0.2)
    return build_nat_model(DiNAT, "nat_tiny", pretrained, dict(model_args, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), kernel_size=7, mlp_ratio=2.0,
                      drop_path_rate=0.3, layer_scale=1e-5)
    return build_nat_model(DiNAT, "nat_small", pretrained, dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), kernel_size=7, mlp_ratio=2.0,
                      drop_path_rate=0.5, layer_scale=1e-5)
    return build_nat_model(DiNAT, "nat_base", pretrained, dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), kernel_size=7, mlp_ratio=3.0,
                      drop_path_rate=0.2)
    return build_nat_model(DiNAT, "dinat_mini", pretrained, dict(model_args, **kwargs), sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), kernel_size=7, mlp_ratio=3.0,
                      drop_path_rate=0.2)
    return build_nat_model(DiNAT, "dinat_tiny", pretrained, dict(model_args, **kwargs), sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), kernel_size=7, mlp_ratio=2.0,
                      drop_path_rate=0.3)
    return build_nat_model(DiNAT, "dinat_small", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), kernel_size=7, mlp_ratio=2.0,
                      drop_path_rate=0.5, layer_scale=1e-5)
    return build_nat_model(DiNAT, "dinat_base", pretrained, dict(model_args, **kwargs), sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), kernel_size=7, mlp_ratio=2.0,
                      drop_path_rate=0.35)
    return build_nat_model(DiNAT, "dinat_large", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), kernel_size=7, mlp_ratio=2.0,
                      drop_path_rate=0.35)
    return build_nat_model(DiNAT, "dinat_large_384", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(13, 6, 3, 1))


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs) -> DiNAT:
    model_args = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), kernel_size=11, mlp_ratio=2.0,
                      drop_path_rate=0.35)
    return build_nat_model(DiNAT, "dinat_large_384_11x11", pretrained, dict(model_args, **kwargs),
                           sparse_dilations=(8, 4, 2, 1))
