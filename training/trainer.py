"""The training run: build everything from the config, resume if asked, loop over epochs, checkpoint.

Read top to bottom: set-up, model, data, optimizer/scheduler/EMA/mixup, resume, epochs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from . import checkpoint, data, distributed
from .config import amp_dtype as resolve_amp, check_train, plain_dict
from .loop import Parts, Position, evaluate, train_one_epoch
from .model import build_model
from .preemption import PreemptionHandler
from .tracking import create_tracker

log = logging.getLogger(__name__)


def train(cfg: DictConfig, preemption: Optional[PreemptionHandler] = None,
          on_update: Optional[Callable[[Position], None]] = None) -> dict:
    """Train as ``cfg`` says. Returns a summary dict; ``summary["preempted"]`` names the signal if one stopped it.

    ``preemption``: an installed handler (train.py installs one so it can hand the signal on after
    returning); without one, a handler is installed for the duration of the call.
    ``on_update``: called after every optimizer update with the current :class:`Position`.
    """
    check_train(cfg)
    dist_env = distributed.setup(str(cfg.device))
    own_handler = preemption is None
    if own_handler:
        preemption = PreemptionHandler(list(cfg.preempt_signals)).install()
    try:
        return _train(cfg, dist_env, preemption, on_update)
    finally:
        if own_handler:
            preemption.uninstall()
        distributed.cleanup()


def find_resume_checkpoint(resume, checkpoint_dir: Path) -> Optional[Path]:
    if resume in (None, False, "none"):
        return None
    if resume == "auto":
        last = checkpoint_dir / checkpoint.LAST
        return last if last.is_file() else None
    return Path(str(resume))


def check_replicas_agree(model: torch.nn.Module, epoch: int) -> None:
    """DDP keeps replicas identical; verify it (per-tensor sums, compared exactly) so a desync fails loudly."""
    fingerprint = [float(p.detach().double().sum()) for p in model.state_dict().values() if p.is_floating_point()]
    every_rank = distributed.gather_objects(fingerprint)
    differing = [rank for rank, fp in enumerate(every_rank) if fp != every_rank[0]]
    if differing:
        raise RuntimeError(f"after epoch {epoch} the weights on rank(s) {differing} differ from rank 0's: "
                           f"data-parallel replicas went out of sync")
    log.info("after epoch %d the weights of all %d replicas agree", epoch, len(every_rank))


def _remove_hydra_only_dir(path: Path) -> None:
    """Drop a non-zero rank's own Hydra output directory when it holds nothing but Hydra's files."""
    if path.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def _train(cfg: DictConfig, dist_env: distributed.DistEnv, preemption: PreemptionHandler,
           on_update: Optional[Callable[[Position], None]]) -> dict:
    device = dist_env.device
    if not dist_env.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports; the others only warn
    # Rank 0's run directory for everyone: each rank's Hydra may have stamped a different second.
    own_dir = Path(str(cfg.run_dir)).expanduser()
    run_dir = Path(distributed.broadcast_object(str(own_dir)))
    if own_dir != run_dir:
        _remove_hydra_only_dir(own_dir)
    checkpoint_dir = run_dir / "checkpoints"
    if dist_env.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    resolved_config = OmegaConf.to_container(cfg, resolve=True)

    torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # ---- model: the same initial weights on every rank (seeded identically; DDP also broadcasts)
    checkpoint.seed_everything(cfg.seed)
    data.prepare(cfg.data, dist_env)
    raw_model = build_model(cfg.model, num_classes=cfg.data.num_classes, in_chans=cfg.data.in_chans,
                            pretrained_file=cfg.get("finetune_from"),
                            pretrained_num_classes=cfg.get("finetune_num_classes"))
    data_config = data.model_data_config(raw_model, cfg.data)
    raw_model.to(device)
    if cfg.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    # From here on each rank draws its own randomness (drop-path, mixup, augmentation).
    checkpoint.seed_everything(cfg.seed + 1000 * dist_env.rank)

    # ---- data
    train_set = data.build_dataset(cfg.data, cfg.data.train_split, True, data.train_transform(data_config, cfg.data.aug),
                                   batch_size=cfg.batch_size)
    val_set = data.build_dataset(cfg.data, cfg.data.val_split, False, data.eval_transform(data_config))
    pin = device.type == "cuda"
    train_loader = data.train_loader(train_set, cfg.batch_size, cfg.workers, dist_env, cfg.seed, pin)
    val_loader = data.eval_loader(val_set, cfg.eval_batch_size or cfg.batch_size, cfg.workers, dist_env, pin)
    accum = cfg.grad_accum_steps
    updates_per_epoch = len(train_loader) // accum
    if updates_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} x grad_accum_steps={accum} x {dist_env.world_size} "
                         f"process(es) is larger than the training split ({len(train_set)} images)")

    # ---- optimizer, schedule, precision, EMA, mixup, loss
    global_batch = cfg.batch_size * accum * dist_env.world_size
    lr = cfg.optim.lr
    if cfg.optim.get("lr_base_batch_size"):
        lr = lr * global_batch / cfg.optim.lr_base_batch_size  # linear scaling rule
    optimizer = create_optimizer_v2(raw_model, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay,
                                    layer_decay=cfg.optim.get("layer_decay"),
                                    **plain_dict(cfg.optim.get("kwargs")))
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched.name, num_epochs=cfg.sched.epochs, warmup_epochs=cfg.sched.warmup_epochs,
        cooldown_epochs=cfg.sched.cooldown_epochs, warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr,
        decay_rate=cfg.sched.get("decay_rate", 0.1), step_on_epochs=not cfg.sched.per_step,
        updates_per_epoch=updates_per_epoch)
    amp = resolve_amp(str(cfg.amp), device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = ModelEmaV3(raw_model, decay=cfg.ema.decay) if cfg.ema.enabled else None
    aug = cfg.data.aug
    mixup = None
    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                      switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode, label_smoothing=cfg.label_smoothing,
                      num_classes=cfg.data.num_classes)
        loss_fn = SoftTargetCrossEntropy()  # Mixup already folds label smoothing into the soft targets
    elif cfg.label_smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()

    # ---- resume
    pos = Position()
    best = {"top1": float("-inf"), "epoch": -1}
    metrics: dict = {}
    wandb_run_id = None
    saved_rng = None
    resume_path = find_resume_checkpoint(cfg.resume, checkpoint_dir)
    if resume_path is not None:
        state = checkpoint.load(resume_path)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        pos = Position(**state["position"])
        best = state["best"]
        wandb_run_id = state.get("wandb_run_id")
        metrics = state.get("metrics") or {}
        if state["world_size"] == dist_env.world_size:
            saved_rng = {k: v[dist_env.rank] for k, v in state["rng"].items()}
        else:
            log.warning("checkpoint was written by %d process(es), this run has %d: training continues, but the "
                        "random streams (augmentation, drop-path) are not those of an uninterrupted run",
                        state["world_size"], dist_env.world_size)
        scheduler.step_update(num_updates=pos.update)
        log.info("resumed from %s at epoch %d (%d batches in), update %d", resume_path, pos.epoch,
                 pos.batches_done, pos.update)
        del state

    # ---- wrap for speed and data parallelism (after loading: state dicts belong to raw_model)
    eval_model = torch.compile(raw_model) if cfg.compile else raw_model
    model = eval_model
    if dist_env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            eval_model, device_ids=[device.index] if device.type == "cuda" else None)
    parts = Parts(model=model, raw_model=raw_model, eval_model=eval_model, optimizer=optimizer,
                  scheduler=scheduler, scaler=scaler, ema=ema, mixup=mixup, loss_fn=loss_fn, device=device,
                  amp_dtype=amp, channels_last=cfg.channels_last, grad_accum_steps=accum, clip_grad=cfg.clip_grad)

    tracker = create_tracker(cfg.logger, resolved_config, str(run_dir), wandb_run_id, dist_env.is_main)
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info("%s: %.2fM parameters | %d train / %d val images | global batch %d (%d x %d accum x %d proc) | "
             "lr %.3g | %d updates/epoch x %d epochs | amp %s | device %s | run dir %s",
             cfg.model.name, n_params / 1e6, len(train_set), len(val_set), global_batch, cfg.batch_size, accum,
             dist_env.world_size, lr, updates_per_epoch, total_epochs, str(amp).replace("torch.", "") if amp else "off",
             device, run_dir)

    def save(epoch_start_rng: Optional[dict], epoch_metrics: Optional[dict], is_best: bool) -> Optional[Path]:
        # Collective: every rank contributes its RNG state; rank 0 writes.
        current_rng = distributed.gather_objects(checkpoint.capture_rng(device))
        start_rng = distributed.gather_objects(epoch_start_rng)
        path = None
        if dist_env.is_main:
            state = {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "position": vars(pos).copy(), "best": dict(best), "metrics": epoch_metrics,
                "rng": {"current": current_rng, "epoch_start": start_rng},
                "world_size": dist_env.world_size, "config": resolved_config, "wandb_run_id": tracker.run_id,
            }
            path = checkpoint.save_atomic(state, checkpoint_dir / checkpoint.LAST)
            if is_best:
                checkpoint.copy_atomic(path, checkpoint_dir / checkpoint.BEST)
        distributed.barrier()  # nobody exits (or reads the file) before it is complete
        return path

    summary = {"run_dir": str(run_dir), "checkpoint": None, "best_checkpoint": None, "preempted": None}
    exit_code = 0
    try:
        if saved_rng is not None and pos.batches_done == 0:
            checkpoint.restore_rng(saved_rng["current"], device)
        for epoch in range(pos.epoch, total_epochs):
            pos.epoch = epoch
            data.set_epoch(train_loader, epoch, cfg.seed, dist_env.rank)
            if saved_rng is not None and pos.batches_done > 0:
                # Replay the interrupted epoch: same iterator from the same RNG state, skip what was done,
                # then continue from the RNG state saved at the interruption.
                epoch_start_rng = saved_rng["epoch_start"]
                checkpoint.restore_rng(epoch_start_rng, device)
                batches = iter(train_loader)
                for _ in range(pos.batches_done):
                    next(batches)
                checkpoint.restore_rng(saved_rng["current"], device)
            else:
                pos.batches_done = 0
                epoch_start_rng = checkpoint.capture_rng(device)
                batches = iter(train_loader)
            saved_rng = None

            bar = tqdm(total=updates_per_epoch * accum * cfg.batch_size * dist_env.world_size,
                       initial=pos.batches_done * cfg.batch_size * dist_env.world_size, unit="img",
                       desc=f"epoch {epoch + 1}/{total_epochs}", dynamic_ncols=True, leave=False,
                       disable=not (dist_env.is_main and cfg.progress_bar))
            with bar:
                result = train_one_epoch(parts, batches, pos, updates_per_epoch, dist_env,
                                         lambda: preemption.requested, bar=bar, on_update=on_update,
                                         log_metrics=tracker.log, log_interval=cfg.log_interval)
            del batches
            if result["stopped"]:
                path = save(epoch_start_rng, metrics or None, is_best=False)
                signal_name = preemption.received.name if preemption.received else "stop request (another rank)"
                log.warning("%s: checkpoint saved at epoch %d, update %d (%s); resume=auto continues from it",
                            signal_name, epoch, pos.update, path or checkpoint_dir / checkpoint.LAST)
                summary.update(preempted=signal_name, checkpoint=str(checkpoint_dir / checkpoint.LAST))
                exit_code = 1
                return summary

            scheduler.step(epoch + 1)
            metrics = {"epoch": epoch + 1, "train/loss": result["loss"],
                       "train/img_per_s": result["images"] / max(result["seconds"], 1e-9),
                       "train/lr": optimizer.param_groups[0]["lr"]}
            last_epoch = epoch + 1 == total_epochs
            is_best = False
            if (epoch + 1) % cfg.eval_interval == 0 or last_epoch:
                val = evaluate(parts.eval_model, val_loader, device, amp, cfg.channels_last)
                metrics.update({f"val/{k}": v for k, v in val.items() if k != "count"})
                if ema is not None:
                    ema_val = evaluate(ema.module, val_loader, device, amp, cfg.channels_last)
                    metrics.update({f"val_ema/{k}": v for k, v in ema_val.items() if k != "count"})
                is_best = val["top1"] > best["top1"]
                if is_best:
                    best = {"top1": val["top1"], "epoch": epoch + 1}
            pos.epoch, pos.batches_done = epoch + 1, 0
            if dist_env.distributed:
                check_replicas_agree(raw_model, epoch + 1)
            save(None, metrics, is_best)
            tracker.log(metrics, step=pos.update)
            line = (f"epoch {epoch + 1}/{total_epochs} | train loss {result['loss']:.4f} | "
                    f"lr {metrics['train/lr']:.2e} | {metrics['train/img_per_s']:.0f} img/s | "
                    f"{result['seconds']:.1f}s")
            if "val/top1" in metrics:
                line += (f" | val loss {metrics['val/loss']:.4f} top-1 {metrics['val/top1']:.2f}% "
                         f"top-5 {metrics['val/top5']:.2f}%")
            if "val_ema/top1" in metrics:
                line += f" | ema top-1 {metrics['val_ema/top1']:.2f}%"
            log.info(line)
    except BaseException:
        exit_code = 1
        raise
    finally:
        tracker.finish(exit_code=exit_code)

    summary.update(checkpoint=str(checkpoint_dir / checkpoint.LAST), best_checkpoint=str(checkpoint_dir / checkpoint.BEST),
                   metrics=metrics, best=best, epochs=total_epochs)
    return summary
