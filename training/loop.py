"""One training epoch and one evaluation pass. Everything stateful is passed in explicitly."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from tqdm import tqdm

from . import distributed


@dataclass
class Parts:
    """The objects one optimizer step touches."""

    model: torch.nn.Module         # what the training forward runs on (DDP and/or compiled)
    raw_model: torch.nn.Module     # the plain module: state dicts and EMA read it
    eval_model: torch.nn.Module    # compiled but not DDP-wrapped: evaluation runs per rank
    optimizer: torch.optim.Optimizer
    scheduler: object              # timm scheduler, stepped per optimizer update
    scaler: torch.amp.GradScaler   # enabled for fp16 only
    ema: Optional[torch.nn.Module]  # timm ModelEmaV3 or None
    mixup: Optional[Callable]      # timm Mixup or None
    random_erasing: Optional[Callable]  # timm RandomErasing on the batch (after mixup) or None
    loss_fn: torch.nn.Module
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    grad_accum_steps: int
    clip_grad: Optional[float]


@dataclass
class Position:
    """Where training is: ``batches_done`` loader batches into ``epoch``; ``update`` optimizer steps in all."""

    epoch: int = 0
    batches_done: int = 0
    update: int = 0


class NonFiniteLossError(FloatingPointError):
    pass


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def to_device(images, targets, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def train_one_epoch(parts: Parts, batches: Iterator, pos: Position, updates_per_epoch: int,
                    dist_env: distributed.DistEnv, stop_requested: Callable[[], bool],
                    bar: Optional[tqdm] = None, on_update: Optional[Callable[[Position], None]] = None,
                    log_metrics: Optional[Callable[[dict, int], None]] = None, log_interval: int = 50) -> dict:
    """Run optimizer updates until the epoch ends or a stop is requested; ``pos`` is advanced in place.

    Returns ``{"loss", "images", "seconds", "stopped"}`` for the updates run in this call. Every
    update all-reduces one small tensor (loss, non-finite flag, stop flag) so all ranks stop together.
    """
    parts.model.train()
    batches_per_epoch = updates_per_epoch * parts.grad_accum_steps
    loss_sum, loss_count, images_seen = 0.0, 0, 0
    start = time.perf_counter()
    stopped = False
    while pos.batches_done < batches_per_epoch:
        group_loss, group_images = forward_backward(parts, batches, pos, dist_env, bar)
        images_seen += group_images
        mean_loss, stop = agree_across_ranks(parts, group_loss, stop_requested(), pos, dist_env)
        optimizer_step(parts, pos)
        loss_sum += mean_loss
        loss_count += 1
        lr = parts.optimizer.param_groups[0]["lr"]
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if log_metrics is not None and pos.update % log_interval == 0:
            log_metrics({"train/loss": mean_loss, "train/lr": lr,
                         "train/img_per_s": images_seen / (time.perf_counter() - start),
                         "epoch": pos.epoch + pos.batches_done / batches_per_epoch}, pos.update)
        if on_update is not None:
            on_update(pos)
        if stop:
            stopped = True
            break
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / max(loss_count, 1), "images": images_seen, "seconds": seconds, "stopped": stopped}


def forward_backward(parts: Parts, batches: Iterator, pos: Position, dist_env: distributed.DistEnv,
                     bar: Optional[tqdm]) -> tuple[torch.Tensor, int]:
    """One accumulation group: ``grad_accum_steps`` micro-batches, gradients summed (loss scaled by 1/N).

    Returns the group's summed loss (a device tensor: no sync here) and the images all ranks saw.
    """
    accum = parts.grad_accum_steps
    group_loss = torch.zeros((), device=parts.device)
    images_seen = 0
    for micro in range(accum):
        images, targets = to_device(*next(batches), parts.device, parts.channels_last)
        if parts.mixup is not None:
            images, targets = parts.mixup(images, targets)
        if parts.random_erasing is not None:  # after mixing, as the released pipeline did
            images = parts.random_erasing(images)
        last_micro = micro == accum - 1
        # DDP all-reduces gradients only on the last micro-batch of an accumulation group.
        sync = contextlib.nullcontext() if last_micro or not hasattr(parts.model, "no_sync") else parts.model.no_sync()
        with sync:
            with autocast(parts.device, parts.amp_dtype):
                loss = parts.loss_fn(parts.model(images), targets)
            parts.scaler.scale(loss / accum).backward()
        group_loss += loss.detach().float()
        pos.batches_done += 1
        images_seen += images.shape[0] * dist_env.world_size
        if bar is not None:
            bar.update(images.shape[0] * dist_env.world_size)
    return group_loss, images_seen


def agree_across_ranks(parts: Parts, group_loss: torch.Tensor, stop_here: bool, pos: Position,
                       dist_env: distributed.DistEnv) -> tuple[float, bool]:
    """The update's mean loss over ranks, and whether any rank asked to stop; raises on a non-finite loss.

    This is the loop's one CPU-GPU sync per update, and it is needed: every rank must take the same
    branch (step or raise, continue or stop) or the next collective deadlocks, and a non-finite loss
    must stop training before the optimizer writes NaNs into the weights.
    """
    accum = parts.grad_accum_steps
    flags = torch.stack([group_loss / accum, (~torch.isfinite(group_loss)).float(),
                         torch.tensor(float(stop_here), device=parts.device)])
    mean_loss, nonfinite, stop = (distributed.all_reduce_sum(flags) / torch.tensor(
        [dist_env.world_size, 1.0, 1.0], device=parts.device)).tolist()
    if nonfinite:
        raise NonFiniteLossError(
            f"loss is {mean_loss} (not finite) at epoch {pos.epoch}, update {pos.update + 1}: stopping "
            f"without saving. Lower optim.lr, set clip_grad, or switch amp (bf16 is safer than fp16); "
            f"resume=auto restarts from the last good checkpoint.")
    return mean_loss, bool(stop)


def optimizer_step(parts: Parts, pos: Position) -> None:
    """Clip, step (through the fp16 loss scaler, a no-op otherwise), EMA, then the per-update schedule."""
    if parts.clip_grad:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    pos.update += 1
    if parts.ema is not None:
        parts.ema.update(parts.raw_model, step=pos.update)
    parts.scheduler.step_update(num_updates=pos.update)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, progress: bool = False, desc: str = "eval") -> dict:
    """Cross-entropy loss and top-1/top-5 accuracy (%) over the whole loader, summed exactly across ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images, targets = to_device(images, targets, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        n = targets.shape[0]
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))  # percentages of n
        # Accumulated on the device (no per-batch sync); hits are whole numbers, rounded back from %.
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               (top1.double() * n / 100).round(), (top5.double() * n / 100).round(),
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
    loss, hits1, hits5, count = distributed.all_reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError("evaluation saw no images: the validation split is empty")
    return {"loss": loss / count, "top1": 100.0 * hits1 / count, "top5": 100.0 * hits5 / count,
            "count": int(count)}
