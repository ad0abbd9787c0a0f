"""Checkpoint formats: the original SHI-Labs layout (our own key names) and Hugging Face's.

``checkpoint_filter_fn(state_dict, model)`` detects the format, converts Hugging Face keys
(``DinatForImageClassification`` / ``NatForImageClassification`` and their backbone-only models)
to ours, optionally resizes relative position biases of another kernel size, and rejects a
state dict that matches neither layout with the offending keys listed.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict

import torch
import torch.nn as nn
from timm.layers import resize_rel_pos_bias_table_simple

__all__ = [
    "checkpoint_filter_fn",
    "convert_hf_state_dict",
    "is_hf_state_dict",
    "interpolate_rpb",
    "load_checkpoint",
    "CheckpointFormatMixin",
]

# Hugging Face prefixes: the classification model wraps the backbone as `dinat.` / `nat.`; a bare
# DinatModel / NatModel has no prefix.
_HF_ROOTS = ("dinat.", "nat.", "")
_HF_MARKERS = ("dinat.embeddings.", "nat.embeddings.", "dinat.encoder.", "nat.encoder.",
               "embeddings.patch_embeddings.", "encoder.levels.")

# Per-layer renames, longest match first (`attention.output.dense` before `output.dense`).
_HF_LAYER_RENAMES = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.self.rpb", "attn.rpb"),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_LAYER = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")


def is_hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(_HF_MARKERS) or k == "classifier.weight" for k in state_dict)


def _strip_hf_root(key: str) -> str:
    for root in _HF_ROOTS[:-1]:
        if key.startswith(root):
            return key[len(root):]
    return key


def convert_hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face DiNAT/NAT keys -> the original (and our) keys.

    ``query``/``key``/``value`` are concatenated in that order into ``attn.qkv``;
    ``layer_scale_parameters`` ``[2, dim]`` splits into ``gamma1``/``gamma2``.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv_parts: Dict[tuple, Dict[str, torch.Tensor]] = {}
    unknown = []
    for full_key, value in state_dict.items():
        key = _strip_hf_root(full_key)
        if key.startswith("pooler."):
            continue  # parameter-free in HF, nothing to carry
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key[len("embeddings.patch_embeddings.projection."):]] = value
        elif key.startswith("embeddings.norm."):
            out["patch_embed.norm." + key[len("embeddings.norm."):]] = value
        elif key.startswith("layernorm."):
            out["norm." + key[len("layernorm."):]] = value
        elif key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = value
        elif (m := re.match(r"^encoder\.levels\.(\d+)\.downsample\.(.+)$", key)) is not None:
            out[f"levels.{m.group(1)}.downsample.{m.group(2)}"] = value
        elif (m := _HF_LAYER.match(key)) is not None:
            level, block, rest = m.groups()
            prefix = f"levels.{level}.blocks.{block}."
            if (q := _HF_QKV.match(rest)) is not None:
                qkv_parts.setdefault((prefix, q.group(2)), {})[q.group(1)] = value
            elif rest == "layer_scale_parameters":
                out[prefix + "gamma1"], out[prefix + "gamma2"] = value[0], value[1]
            else:
                for old, new in _HF_LAYER_RENAMES:
                    if rest.startswith(old):
                        out[prefix + new + rest[len(old):]] = value
                        break
                else:
                    unknown.append(full_key)
        else:
            unknown.append(full_key)
    for (prefix, kind), parts in qkv_parts.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"Hugging Face checkpoint: {prefix} has {sorted(parts)} {kind} but needs query, key "
                             f"and value")
        out[prefix + "attn.qkv." + kind] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unknown:
        raise ValueError(f"Hugging Face checkpoint has keys with no DiNAT/NAT counterpart: {unknown[:20]}")
    return out


def interpolate_rpb(rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Resize a ``[heads, 2k'-1, 2k'-1]`` bias to ``[heads, 2k-1, 2k-1]`` bicubically.

    This is how the authors built their 11x11 checkpoints from 7x7 ones (the same interpolation
    Swin uses when its window size changes).
    """
    size = 2 * kernel_size - 1
    # timm's resizer for [heads, 2k-1, 2k-1] tables (bicubic, align_corners=False), computed in float32.
    resized = resize_rel_pos_bias_table_simple(rpb.float(), (kernel_size, kernel_size), (rpb.shape[0], size, size))
    return resized.to(rpb.dtype)


def _summarise(keys, limit=12):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module, interpolate_rpb: bool = False,
                         strict: bool = True) -> Dict[str, torch.Tensor]:
    """Bring an original SHI-Labs or Hugging Face state dict into ``model``'s key layout.

    ``interpolate_rpb=True`` resizes every ``rpb`` whose kernel size differs from the model's;
    otherwise such a mismatch is a ValueError. With ``strict`` a state dict whose keys are not a
    subset of the model's (neither format) is a ValueError listing unexpected and missing keys.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]  # the original training script's wrapper
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if is_hf_state_dict(state_dict):
        state_dict = convert_hf_state_dict(state_dict)
    # The original global-attention baseline stores its (derivable) index table as a buffer.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("attn.relative_position_index")}

    own = model.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    if strict and unexpected:
        missing = [k for k in own if k not in state_dict]
        raise ValueError(
            f"checkpoint matches neither the original SHI-Labs layout nor the Hugging Face layout of "
            f"{type(model).__name__}: unexpected keys {_summarise(unexpected)}; missing keys {_summarise(missing)}"
        )
    for key, value in list(state_dict.items()):
        if not key.endswith("rpb") or key not in own or value.shape == own[key].shape:
            continue
        target = own[key].shape
        if value.dim() != 3 or value.shape[0] != target[0] or value.shape[1] != value.shape[2]:
            raise ValueError(f"checkpoint {key} has shape {list(value.shape)}; the model needs {list(target)}")
        if not interpolate_rpb:
            raise ValueError(
                f"checkpoint {key} is for kernel size {(value.shape[-1] + 1) // 2} (shape {list(value.shape)}) but "
                f"the model uses {(target[-1] + 1) // 2} ({list(target)}); pass interpolate_rpb=True to resize it "
                f"bicubically"
            )
        state_dict[key] = interpolate_rpb_fn(value, (target[-1] + 1) // 2)
    return state_dict


interpolate_rpb_fn = interpolate_rpb  # the filter's keyword shadows the function's name


def load_checkpoint(model: nn.Module, path: str, interpolate_rpb: bool = False, strict: bool = True):
    """Load an original or Hugging Face checkpoint file (``.pth``/``.bin``/``.safetensors``) into ``model``.

    Files are read with ``weights_only=True``. Returns the ``load_state_dict`` result.
    """
    from timm.models import load_state_dict

    state_dict = load_state_dict(str(path), use_ema=False, weights_only=True)
    state_dict = checkpoint_filter_fn(state_dict, model, interpolate_rpb=interpolate_rpb, strict=strict)
    return nn.Module.load_state_dict(model, state_dict, strict=strict)


class CheckpointFormatMixin:
    """``load_state_dict`` accepts either checkpoint format (so timm's ``checkpoint_path=`` does too)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        metadata = getattr(state_dict, "_metadata", None)  # per-module versions, kept for torch
        state_dict = OrderedDict(checkpoint_filter_fn(dict(state_dict), self, strict=strict))
        if metadata is not None:
            state_dict._metadata = metadata
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
