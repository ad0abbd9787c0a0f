"""The training run: build everything from the config, resume if asked, loop over epochs, checkpoint.

``_train`` reads top to bottom as the run's steps: run directory, model, data, optimization,
resume, wrapping, then the epochs (each: batches, updates, validation, checkpoint, log line).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from tqdm import tqdm

from . import checkpoint, data, distributed
from .config import amp_dtype as resolve_amp, check_train
from .loop import Parts, Position, evaluate, train_one_epoch
from .model import build_model
from .optim import build_optimizer, build_scheduler
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


def _train(cfg: DictConfig, dist_env: distributed.DistEnv, preemption: PreemptionHandler,
           on_update: Optional[Callable[[Position], None]]) -> dict:
    run_dir = prepare_run_dir(cfg, dist_env)
    set_determinism(cfg.deterministic)
    raw_model, data_config = build_model_on_device(cfg, dist_env)
    loaders = build_loaders(cfg, data_config, dist_env)
    optim = build_optimization(cfg, raw_model, loaders.updates_per_epoch, dist_env)
    progress = resume_if_asked(cfg, run_dir, raw_model, optim, dist_env)
    parts = wrap_for_training(cfg, raw_model, optim, dist_env)
    resolved_config = OmegaConf.to_container(cfg, resolve=True)
    tracker = create_tracker(cfg.logger, resolved_config, str(run_dir), progress.wandb_run_id, dist_env.is_main)
    run = Run(cfg, dist_env, run_dir, resolved_config, parts, loaders, optim, progress, tracker)
    log_set_up(run)
    return run_epochs(run, preemption, on_update)


# ----------------------------------------------------------------------------- the run's parts
@dataclass
class Loaders:
    train_set: object
    val_set: object
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    updates_per_epoch: int


@dataclass
class Optimization:
    """Optimizer, schedule and everything else one update uses besides the model."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    total_epochs: int
    lr: float                      # after linear scaling (if optim.lr_base_batch_size is set)
    global_batch: int
    amp: Optional[torch.dtype]
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEmaV3]
    mixup: Optional[Mixup]
    random_erasing: Optional[Callable]
    loss_fn: torch.nn.Module


@dataclass
class Progress:
    """What a checkpoint carries over besides weights and optimizer state."""

    pos: Position = field(default_factory=Position)
    # best validation top-1 so far; "weights" says whose: "ema" when EMA is on (as released), else "model"
    best: dict = field(default_factory=lambda: {"top1": float("-inf"), "epoch": -1})
    metrics: dict = field(default_factory=dict)
    wandb_run_id: Optional[str] = None
    saved_rng: Optional[dict] = None   # this rank's RNG states from the checkpoint, until they are restored


@dataclass
class Run:
    cfg: DictConfig
    dist_env: distributed.DistEnv
    run_dir: Path
    resolved_config: dict
    parts: Parts
    loaders: Loaders
    optim: Optimization
    progress: Progress
    tracker: object

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


# ----------------------------------------------------------------------------- set-up steps
def prepare_run_dir(cfg: DictConfig, dist_env: distributed.DistEnv) -> Path:
    """Rank 0's run directory for everyone (each rank's Hydra may have stamped a different second)."""
    if not dist_env.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports; the others only warn
    own_dir = Path(str(cfg.run_dir)).expanduser()
    run_dir = Path(distributed.broadcast_object(str(own_dir)))
    if own_dir != run_dir:
        _remove_hydra_only_dir(own_dir)
    if dist_env.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def _remove_hydra_only_dir(path: Path) -> None:
    """Drop a non-zero rank's own Hydra output directory when it holds nothing but Hydra's files."""
    if path.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def set_determinism(deterministic: bool) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_model_on_device(cfg: DictConfig, dist_env: distributed.DistEnv):
    """The same initial weights on every rank (seeded identically; DDP also broadcasts)."""
    checkpoint.seed_everything(cfg.seed)
    data.prepare(cfg.data, dist_env)
    raw_model = build_model(cfg.model, num_classes=cfg.data.num_classes, in_chans=cfg.data.in_chans,
                            pretrained_file=cfg.get("finetune_from"),
                            pretrained_num_classes=cfg.get("finetune_num_classes"))
    data_config = data.model_data_config(raw_model, cfg.data)
    raw_model.to(dist_env.device)
    if cfg.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    # From here on each rank draws its own randomness (drop-path, mixup, augmentation).
    checkpoint.seed_everything(cfg.seed + 1000 * dist_env.rank)
    return raw_model, data_config


def build_loaders(cfg: DictConfig, data_config: dict, dist_env: distributed.DistEnv) -> Loaders:
    train_set = data.build_dataset(cfg.data, cfg.data.train_split, True, data.train_transform(data_config, cfg.data.aug),
                                   batch_size=cfg.batch_size)
    val_set = data.build_dataset(cfg.data, cfg.data.val_split, False, data.eval_transform(data_config))
    pin = dist_env.device.type == "cuda"
    train_loader = data.train_loader(train_set, cfg.batch_size, cfg.workers, dist_env, cfg.seed, pin)
    val_loader = data.eval_loader(val_set, cfg.eval_batch_size or cfg.batch_size, cfg.workers, dist_env, pin)
    updates_per_epoch = len(train_loader) // cfg.grad_accum_steps
    if updates_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} x grad_accum_steps={cfg.grad_accum_steps} x "
                         f"{dist_env.world_size} process(es) is larger than the training split ({len(train_set)} images)")
    return Loaders(train_set, val_set, train_loader, val_loader, updates_per_epoch)


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """``optim.lr``, scaled linearly by ``global_batch / optim.lr_base_batch_size`` when that is set."""
    if not optim_cfg.get("lr_base_batch_size"):
        return optim_cfg.lr  # null: the lr as given (the released train.py never scales)
    return optim_cfg.lr * global_batch / optim_cfg.lr_base_batch_size


def build_optimization(cfg: DictConfig, raw_model: torch.nn.Module, updates_per_epoch: int,
                       dist_env: distributed.DistEnv) -> Optimization:
    global_batch = cfg.batch_size * cfg.grad_accum_steps * dist_env.world_size
    lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(raw_model, cfg.optim, lr)
    scheduler, total_epochs = build_scheduler(optimizer, cfg.sched, updates_per_epoch)
    amp = resolve_amp(str(cfg.amp), dist_env.device)
    scaler = torch.amp.GradScaler(dist_env.device.type, enabled=amp == torch.float16)
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
    return Optimization(optimizer, scheduler, total_epochs, lr, global_batch, amp, scaler, ema, mixup,
                        data.batch_random_erasing(aug, dist_env.device), loss_fn)


def find_resume_checkpoint(resume, checkpoint_dir: Path) -> Optional[Path]:
    if resume in (None, False, "none"):
        return None
    if resume == "auto":
        last = checkpoint_dir / checkpoint.LAST
        return last if last.is_file() else None
    return Path(str(resume))


def resume_if_asked(cfg: DictConfig, run_dir: Path, raw_model: torch.nn.Module, optim: Optimization,
                    dist_env: distributed.DistEnv) -> Progress:
    """Load the training state from the checkpoint ``cfg.resume`` names (if any) into the built objects."""
    resume_path = find_resume_checkpoint(cfg.resume, run_dir / "checkpoints")
    if resume_path is None:
        return Progress()
    state = checkpoint.load(resume_path)
    raw_model.load_state_dict(state["model"])
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    optim.scaler.load_state_dict(state["scaler"])
    if optim.ema is not None and state.get("ema") is not None:
        optim.ema.module.load_state_dict(state["ema"])
    progress = Progress(pos=Position(**state["position"]), best=state["best"],
                        metrics=state.get("metrics") or {}, wandb_run_id=state.get("wandb_run_id"))
    if state["world_size"] == dist_env.world_size:
        progress.saved_rng = {k: v[dist_env.rank] for k, v in state["rng"].items()}
    else:
        log.warning("checkpoint was written by %d process(es), this run has %d: training continues, but the "
                    "random streams (augmentation, drop-path) are not those of an uninterrupted run",
                    state["world_size"], dist_env.world_size)
    optim.scheduler.step_update(num_updates=progress.pos.update)
    log.info("resumed from %s at epoch %d (%d batches in), update %d", resume_path, progress.pos.epoch,
             progress.pos.batches_done, progress.pos.update)
    return progress


def wrap_for_training(cfg: DictConfig, raw_model: torch.nn.Module, optim: Optimization,
                      dist_env: distributed.DistEnv) -> Parts:
    """Compile and DDP-wrap (after loading: state dicts belong to ``raw_model``)."""
    device = dist_env.device
    eval_model = torch.compile(raw_model) if cfg.compile else raw_model
    model = eval_model
    if dist_env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            eval_model, device_ids=[device.index] if device.type == "cuda" else None)
    return Parts(model=model, raw_model=raw_model, eval_model=eval_model, optimizer=optim.optimizer,
                 scheduler=optim.scheduler, scaler=optim.scaler, ema=optim.ema, mixup=optim.mixup,
                 random_erasing=optim.random_erasing, loss_fn=optim.loss_fn, device=device, amp_dtype=optim.amp,
                 channels_last=cfg.channels_last, grad_accum_steps=cfg.grad_accum_steps, clip_grad=cfg.clip_grad)


def log_set_up(run: Run) -> None:
    cfg, optim = run.cfg, run.optim
    n_params = sum(p.numel() for p in run.parts.raw_model.parameters())
    log.info("%s: %.2fM parameters | %d train / %d val images | global batch %d (%d x %d accum x %d proc) | "
             "lr %.3g | %d updates/epoch x %d epochs | amp %s | device %s | run dir %s",
             cfg.model.timm_model, n_params / 1e6, len(run.loaders.train_set), len(run.loaders.val_set), optim.global_batch,
             cfg.batch_size, cfg.grad_accum_steps, run.dist_env.world_size, optim.lr, run.loaders.updates_per_epoch,
             optim.total_epochs, str(optim.amp).replace("torch.", "") if optim.amp else "off", run.dist_env.device,
             run.run_dir)


# ----------------------------------------------------------------------------- the epochs
def run_epochs(run: Run, preemption: PreemptionHandler, on_update: Optional[Callable[[Position], None]]) -> dict:
    progress, pos = run.progress, run.progress.pos
    summary = {"run_dir": str(run.run_dir), "checkpoint": None, "best_checkpoint": None, "preempted": None}
    exit_code = 0
    try:
        if progress.saved_rng is not None and pos.batches_done == 0:
            checkpoint.restore_rng(progress.saved_rng["current"], run.dist_env.device)
        for epoch in range(pos.epoch, run.optim.total_epochs):
            pos.epoch = epoch
            batches, epoch_start_rng = epoch_batches(run, epoch)
            result = train_epoch(run, batches, preemption, on_update)
            del batches
            if result["stopped"]:
                summary.update(stop_and_save(run, epoch_start_rng, preemption))
                exit_code = 1
                return summary
            run.optim.scheduler.step(epoch + 1)
            progress.metrics = epoch_metrics(run, epoch, result)
            is_best = validate_if_due(run, epoch, progress.metrics)
            pos.epoch, pos.batches_done = epoch + 1, 0
            if run.dist_env.distributed:
                check_replicas_agree(run.parts.raw_model, epoch + 1)
            save_checkpoint(run, None, progress.metrics, is_best)
            run.tracker.log(progress.metrics, step=pos.update)
            log.info(epoch_line(epoch, run.optim.total_epochs, result, progress.metrics))
    except BaseException:
        exit_code = 1
        raise
    finally:
        run.tracker.finish(exit_code=exit_code)
    summary.update(checkpoint=str(run.checkpoint_dir / checkpoint.LAST),
                   best_checkpoint=str(run.checkpoint_dir / checkpoint.BEST),
                   metrics=progress.metrics, best=progress.best, epochs=run.optim.total_epochs)
    return summary


def epoch_batches(run: Run, epoch: int):
    """The epoch's batch iterator and the RNG state it started from.

    After a mid-epoch resume the interrupted epoch is replayed: the same iterator from the same RNG
    state, the batches already done skipped, then the RNG state saved at the interruption restored.
    """
    device, progress = run.dist_env.device, run.progress
    data.set_epoch(run.loaders.train, epoch, run.cfg.seed, run.dist_env.rank)
    if progress.saved_rng is not None and progress.pos.batches_done > 0:
        epoch_start_rng = progress.saved_rng["epoch_start"]
        checkpoint.restore_rng(epoch_start_rng, device)
        batches = iter(run.loaders.train)
        for _ in range(progress.pos.batches_done):
            next(batches)
        checkpoint.restore_rng(progress.saved_rng["current"], device)
    else:
        progress.pos.batches_done = 0
        epoch_start_rng = checkpoint.capture_rng(device)
        batches = iter(run.loaders.train)
    progress.saved_rng = None
    return batches, epoch_start_rng


def train_epoch(run: Run, batches, preemption: PreemptionHandler,
                on_update: Optional[Callable[[Position], None]]) -> dict:
    cfg, pos, world = run.cfg, run.progress.pos, run.dist_env.world_size
    updates = run.loaders.updates_per_epoch
    bar = tqdm(total=updates * cfg.grad_accum_steps * cfg.batch_size * world,
               initial=pos.batches_done * cfg.batch_size * world, unit="img",
               desc=f"epoch {pos.epoch + 1}/{run.optim.total_epochs}", dynamic_ncols=True, leave=False,
               disable=not (run.dist_env.is_main and cfg.progress_bar))
    with bar:
        return train_one_epoch(run.parts, batches, pos, updates, run.dist_env, lambda: preemption.requested,
                               bar=bar, on_update=on_update, log_metrics=run.tracker.log,
                               log_interval=cfg.log_interval)


def stop_and_save(run: Run, epoch_start_rng: dict, preemption: PreemptionHandler) -> dict:
    """A stop was requested mid-epoch: save ``last.pt`` there (resume=auto continues from it)."""
    pos = run.progress.pos
    path = save_checkpoint(run, epoch_start_rng, run.progress.metrics or None, is_best=False)
    signal_name = preemption.received.name if preemption.received else "stop request (another rank)"
    log.warning("%s: checkpoint saved at epoch %d, update %d (%s); resume=auto continues from it",
                signal_name, pos.epoch, pos.update, path or run.checkpoint_dir / checkpoint.LAST)
    return {"preempted": signal_name, "checkpoint": str(run.checkpoint_dir / checkpoint.LAST)}


def epoch_metrics(run: Run, epoch: int, result: dict) -> dict:
    return {"epoch": epoch + 1, "train/loss": result["loss"],
            "train/img_per_s": result["images"] / max(result["seconds"], 1e-9),
            "train/lr": run.optim.optimizer.param_groups[0]["lr"]}


def validate_if_due(run: Run, epoch: int, metrics: dict) -> bool:
    """Validate every ``eval_interval`` epochs and after the last; adds ``val/*`` (and ``val_ema/*``) to
    ``metrics``. Returns whether this is the best epoch so far, judged, as the released train.py did,
    by the EMA weights' top-1 when EMA is on and by the model's otherwise."""
    cfg, device, amp = run.cfg, run.dist_env.device, run.optim.amp
    if (epoch + 1) % cfg.eval_interval != 0 and epoch + 1 != run.optim.total_epochs:
        return False
    val = evaluate(run.parts.eval_model, run.loaders.val, device, amp, cfg.channels_last)
    metrics.update({f"val/{k}": v for k, v in val.items() if k != "count"})
    judged, weights = val, "model"
    if run.optim.ema is not None:
        ema_val = evaluate(run.optim.ema.module, run.loaders.val, device, amp, cfg.channels_last)
        metrics.update({f"val_ema/{k}": v for k, v in ema_val.items() if k != "count"})
        judged, weights = ema_val, "ema"
    if judged["top1"] <= run.progress.best["top1"]:
        return False
    run.progress.best = {"top1": judged["top1"], "epoch": epoch + 1, "weights": weights}
    return True


def save_checkpoint(run: Run, epoch_start_rng: Optional[dict], epoch_metrics: Optional[dict],
                    is_best: bool) -> Optional[Path]:
    """Collective: every rank contributes its RNG state; rank 0 writes ``last.pt`` (and ``best.pt``)."""
    device, optim = run.dist_env.device, run.optim
    current_rng = distributed.gather_objects(checkpoint.capture_rng(device))
    start_rng = distributed.gather_objects(epoch_start_rng)
    path = None
    if run.dist_env.is_main:
        state = {
            "model": run.parts.raw_model.state_dict(), "optimizer": optim.optimizer.state_dict(),
            "scheduler": optim.scheduler.state_dict(), "scaler": optim.scaler.state_dict(),
            "ema": optim.ema.module.state_dict() if optim.ema is not None else None,
            "position": vars(run.progress.pos).copy(), "best": dict(run.progress.best), "metrics": epoch_metrics,
            "rng": {"current": current_rng, "epoch_start": start_rng},
            "world_size": run.dist_env.world_size, "config": run.resolved_config,
            "wandb_run_id": run.tracker.run_id,
        }
        path = checkpoint.save_atomic(state, run.checkpoint_dir / checkpoint.LAST)
        if is_best:
            checkpoint.copy_atomic(path, run.checkpoint_dir / checkpoint.BEST)
    distributed.barrier()  # nobody exits (or reads the file) before it is complete
    return path


def check_replicas_agree(model: torch.nn.Module, epoch: int) -> None:
    """DDP keeps replicas identical; verify it (per-tensor sums, compared exactly) so a desync fails loudly."""
    fingerprint = [float(p.detach().double().sum()) for p in model.state_dict().values() if p.is_floating_point()]
    every_rank = distributed.gather_objects(fingerprint)
    differing = [rank for rank, fp in enumerate(every_rank) if fp != every_rank[0]]
    if differing:
        raise RuntimeError(f"after epoch {epoch} the weights on rank(s) {differing} differ from rank 0's: "
                           f"data-parallel replicas went out of sync")
    log.info("after epoch %d the weights of all %d replicas agree", epoch, len(every_rank))


def epoch_line(epoch: int, total_epochs: int, result: dict, metrics: dict) -> str:
    line = (f"epoch {epoch + 1}/{total_epochs} | train loss {result['loss']:.4f} | "
            f"lr {metrics['train/lr']:.2e} | {metrics['train/img_per_s']:.0f} img/s | {result['seconds']:.1f}s")
    if "val/top1" in metrics:
        line += (f" | val loss {metrics['val/loss']:.4f} top-1 {metrics['val/top1']:.2f}% "
                 f"top-5 {metrics['val/top5']:.2f}%")
    if "val_ema/top1" in metrics:
        line += f" | ema top-1 {metrics['val_ema/top1']:.2f}%"
    return line
