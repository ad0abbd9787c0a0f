"""What the model families share: timm's classifier interface and the builder behind every variant.

Every model here is channels-last (NHWC) end to end and has a ``head`` Linear after optional
average pooling; ``NATModelBase`` holds the timm methods that do not depend on the layout of its
blocks, ``build_nat_model`` the one ``build_model_with_cfg`` call every register function uses,
``pretrained_cfg`` the pretrained-cfg defaults of every family.
"""

from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg

from ._checkpoint import CheckpointFormatMixin, checkpoint_filter_fn

__all__ = [
    "NATModelBase", "alternating_dilations", "build_nat_model", "drop_path_rates", "check_global_pool", "check_output_fmt", "make_head",
    "pretrained_cfg", "to_output_fmt",
]


def check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling); got {global_pool!r}")


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC'; got {output_fmt!r}")


def make_head(num_features: int, num_classes: int, device=None, dtype=None) -> nn.Module:
    """The classifier: a Linear, or Identity when ``num_classes`` is 0 (the pooled features come out)."""
    if num_classes > 0:
        return nn.Linear(num_features, num_classes, device=device, dtype=dtype)
    return nn.Identity()


def to_output_fmt(x: torch.Tensor, output_fmt: str) -> torch.Tensor:
    """A channels-last map in ``output_fmt`` (NCHW is made contiguous)."""
    return x.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x


class NATModelBase(CheckpointFormatMixin, nn.Module):
    """timm's model interface shared by every family (either checkpoint format loads, see the mixin).

    Subclasses build ``head`` and set ``num_features``, ``num_classes``, ``global_pool`` and
    ``grad_checkpointing``; they provide ``forward_features``, ``forward_intermediates``,
    ``prune_intermediate_layers`` and ``group_matcher``.
    """

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters() if name.endswith("rpb")}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"rpb"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head on the model's device and dtype, in its train/eval mode; ``global_pool`` None keeps the pooling."""
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = make_head(self.num_features, num_classes, **get_device_dtype(self)).train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def pretrained_cfg(url: str = "", hf: str = "", input_size=(3, 224, 224), reduction: int = 32, **kwargs) -> dict:
    """A pretrained cfg; ``pool_size`` is the unpooled feature map at ``input_size`` (``reduction`` px per token)."""
    return {
        "url": url,
        "hf_hub_id": hf or None,
        "num_classes": 1000,
        "input_size": input_size,
        "pool_size": (input_size[1] // reduction, input_size[2] // reduction),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
        "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **kwargs,
    }


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Stochastic depth per block, rising linearly from 0 to ``drop_path_rate`` over all blocks, split per level.

    Newer timm has ``timm.layers.calculate_drop_path_rates`` for this; our minimum timm (1.0.15) lacks it.
    """
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu")
    return [level.tolist() for level in rates.split(list(depths))]


def alternating_dilations(depth: int, dilation: int) -> List[int]:
    """``[1, d, 1, d, ...]`` over ``depth`` blocks: DiNAT interleaves local and sparse-global NA."""
    return [1 if i % 2 == 0 else dilation for i in range(depth)]


def build_nat_model(model_cls: type, variant: str, pretrained: bool, model_args: dict,
                    sparse_dilations: Optional[Sequence[int]] = None) -> nn.Module:
    """Build a registered variant: ``build_model_with_cfg`` with our checkpoint filter.

    Args:
        model_cls: the family's model class.
        variant: the registered name (selects the pretrained cfg).
        pretrained: load the cfg's weights.
        model_args: the variant's architecture with the caller's keywords merged over it
            (``dict(variant_args, **kwargs)``); ``interpolate_rpb`` (passed on to the checkpoint
            filter) and ``out_indices`` (features_only; default every level, or every block of an
            isotropic model) are taken out of it.
        sparse_dilations: DiNAT's sparse-global dilation, one per level (hierarchical models) or one
            (isotropic): unless ``model_args`` gives ``dilations``, each level alternates dilation 1
            and its value block by block, over the depths in ``model_args`` (so overridden depths
            get the pattern too). None: every dilation 1 (NAT, ViT+RPB).
    """
    args = dict(model_args)
    interpolate_rpb = args.pop("interpolate_rpb", False)
    hierarchical = "depths" in args
    if sparse_dilations is not None and "dilations" not in args:
        if hierarchical:
            args["dilations"] = [alternating_dilations(d, s) for d, s in zip(args["depths"], sparse_dilations)]
        else:
            (dilation,) = sparse_dilations
            args["dilations"] = alternating_dilations(args["depth"], dilation)
    # features_only defaults to every level (timm's swin), or every block (the last ``depth``) of an isotropic model.
    out_indices = args.pop("out_indices", tuple(range(len(args["depths"]))) if hierarchical else args["depth"])
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, interpolate_rpb=interpolate_rpb),
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **args,
    )
