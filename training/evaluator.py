"""Evaluation for eval.py: top-1/top-5/loss of a training checkpoint or of a timm model with weights,
and optional throughput (images/second at a batch size, under AMP)."""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, data, distributed
from .config import amp_dtype as resolve_amp, check_common
from .loop import autocast, evaluate
from .model import build_model

log = logging.getLogger(__name__)


def load_model(cfg: DictConfig) -> torch.nn.Module:
    """The model to evaluate: from a training checkpoint (its own model config), or ``model`` + ``weights``."""
    if cfg.checkpoint and cfg.weights:
        raise ValueError("give either checkpoint= (a training checkpoint) or weights= (a weights file for "
                         "model.timm_model), not both")
    if not cfg.checkpoint:
        # The file must carry a head for data.num_classes classes (evaluation needs it): saying so stops
        # timm from dropping the head when the variant's pretrained config lists another class count.
        return build_model(cfg.model, num_classes=cfg.data.num_classes, in_chans=cfg.data.in_chans,
                           pretrained_file=cfg.weights, pretrained_num_classes=cfg.data.num_classes)
    state = checkpoint.load(cfg.checkpoint)
    trained = state["config"]
    for key in ("num_classes", "in_chans"):
        if trained["data"][key] != cfg.data[key]:
            raise ValueError(f"data.{key}={cfg.data[key]} but the checkpoint was trained with "
                             f"data.{key}={trained['data'][key]}; pass the data options used for training")
    model = build_model(OmegaConf.create(trained["model"]), num_classes=cfg.data.num_classes,
                        in_chans=cfg.data.in_chans)
    if cfg.use_ema:
        if state.get("ema") is None:
            raise ValueError(f"use_ema=true but checkpoint {cfg.checkpoint!r} holds no EMA weights (trained with ema.enabled=false)")
        model.load_state_dict(state["ema"])
    else:
        model.load_state_dict(state["model"])
    return model


@torch.no_grad()
def measure_throughput(model: torch.nn.Module, input_size, batch_size: int, device: torch.device, amp_dtype,
                       channels_last: bool, warmup_steps: int, steps: int) -> float:
    """Forward passes per second x batch on random input (data loading excluded)."""
    model.eval()
    x = torch.randn(batch_size, *input_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with autocast(device, amp_dtype):
        for _ in range(warmup_steps):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
    return batch_size * steps / (time.perf_counter() - start)


def run_eval(cfg: DictConfig) -> dict:
    check_common(cfg)
    dist_env = distributed.setup(str(cfg.device))
    try:
        device = dist_env.device
        data.prepare(cfg.data, dist_env)
        model = load_model(cfg)
        data_config = data.model_data_config(model, cfg.data)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        eval_model = torch.compile(model) if cfg.get("compile") else model
        amp = resolve_amp(str(cfg.amp), device)
        split = cfg.get("split") or cfg.data.val_split
        dataset = data.build_dataset(cfg.data, split, False, data.eval_transform(data_config))
        loader = data.eval_loader(dataset, cfg.batch_size, cfg.workers, dist_env, pin_memory=device.type == "cuda")
        log.info("evaluating %s on %d images of %s/%s (crop_pct %s, %s, amp %s, device %s)",
                 cfg.checkpoint or cfg.model.timm_model, len(dataset), cfg.data.root, split, data_config["crop_pct"],
                 data_config["interpolation"], amp, device)
        metrics = evaluate(eval_model, loader, device, amp, cfg.channels_last,
                           progress=dist_env.is_main and cfg.progress_bar)
        if cfg.throughput.enabled:
            metrics["img_per_s"] = measure_throughput(
                eval_model, data_config["input_size"], cfg.throughput.batch_size, device, amp, cfg.channels_last,
                cfg.throughput.warmup_steps, cfg.throughput.steps)
            metrics["throughput_batch_size"] = cfg.throughput.batch_size
        return metrics
    finally:
        distributed.cleanup()
