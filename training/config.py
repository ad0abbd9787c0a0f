"""Checks on the composed config that Hydra cannot do: value ranges and combinations.

Each error names the key, the rule, and the value given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def _require(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{key} must be {rule}; got {value!r}")


def check_common(cfg: DictConfig) -> None:
    _require(cfg.amp in AMP_CHOICES, "amp", f"one of {AMP_CHOICES}", cfg.amp)
    _require(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "batch_size", "an int >= 1", cfg.batch_size)
    _require(isinstance(cfg.workers, int) and cfg.workers >= 0, "workers", "an int >= 0", cfg.workers)
    d = cfg.data
    _require(isinstance(d.num_classes, int) and d.num_classes >= 1, "data.num_classes", "an int >= 1", d.num_classes)
    _require(d.in_chans in (1, 3), "data.in_chans", "1 or 3", d.in_chans)
    _require(d.img_size is None or (isinstance(d.img_size, int) and d.img_size >= 8), "data.img_size",
             "null (the model's input size) or an int >= 8", d.img_size)
    _require(d.get("crop_pct") is None or 0 < d.crop_pct <= 1, "data.crop_pct", "null or in (0, 1]", d.get("crop_pct"))
    _require(d.root is not None and str(d.root) != "", "data.root", "a path (the dataset folder)", d.root)


def check_train(cfg: DictConfig) -> None:
    check_common(cfg)
    _require(isinstance(cfg.grad_accum_steps, int) and cfg.grad_accum_steps >= 1, "grad_accum_steps",
             "an int >= 1", cfg.grad_accum_steps)
    _require(cfg.clip_grad is None or cfg.clip_grad > 0, "clip_grad", "null or > 0", cfg.clip_grad)
    _require(isinstance(cfg.sched.epochs, int) and cfg.sched.epochs >= 1, "sched.epochs", "an int >= 1",
             cfg.sched.epochs)
    _require(cfg.sched.warmup_epochs >= 0 and cfg.sched.cooldown_epochs >= 0, "sched.warmup_epochs/cooldown_epochs",
             ">= 0", (cfg.sched.warmup_epochs, cfg.sched.cooldown_epochs))
    _require(cfg.optim.lr > 0, "optim.lr", "> 0", cfg.optim.lr)
    _require(cfg.optim.get("lr_base_batch_size") is None or cfg.optim.lr_base_batch_size >= 1,
             "optim.lr_base_batch_size", "null or >= 1", cfg.optim.get("lr_base_batch_size"))
    if cfg.get("finetune_num_classes") is not None:  # it describes the head of the finetune_from file
        _require(cfg.get("finetune_from") is not None, "finetune_from",
                 "the path of the weights to fine-tune (finetune_num_classes is set: this is a fine-tuning "
                 "recipe)", cfg.get("finetune_from"))
    _require(isinstance(cfg.optim.get("decay_rpb", False), bool), "optim.decay_rpb", "true or false",
             cfg.optim.get("decay_rpb"))
    _require(0 <= cfg.label_smoothing < 1, "label_smoothing", "in [0, 1)", cfg.label_smoothing)
    _require(0 < cfg.ema.decay < 1, "ema.decay", "in (0, 1)", cfg.ema.decay)
    aug = cfg.data.aug
    if aug.mixup > 0 or aug.cutmix > 0:
        _require(cfg.batch_size % 2 == 0, "batch_size", "even when data.aug.mixup/cutmix are on (timm's Mixup "
                 "pairs each sample with its mirror in the batch)", cfg.batch_size)
    _require(cfg.logger.name in ("none", "wandb"), "logger.name", "'none' or 'wandb'", cfg.logger.name)
    resume = cfg.resume
    if resume not in (None, False, "auto", "none"):
        _require(Path(str(resume)).is_file(), "resume", "null, 'auto' or the path of an existing checkpoint file",
                 resume)


def amp_dtype(amp: str, device: torch.device):
    """``auto`` = bf16 on a GPU that supports it, full precision elsewhere."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def plain_dict(node) -> dict:
    """A config mapping (or None) as a plain resolved dict, e.g. to pass on as keyword arguments."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
