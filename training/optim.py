"""Optimizer and learning-rate schedule from the ``optim`` / ``sched`` configs (timm underneath).

Two things timm does not give us directly:

- ``optim.decay_rpb``: the released runs decayed the relative-position-bias tables, because their
  models named ``rpb`` only in ``no_weight_decay_keywords``, which timm 0.5 never reads. Our models
  list the tables in ``no_weight_decay()`` (timm's convention, which exempts them); ``decay_rpb=true``
  puts them back in the decayed group, as released.
- ``sched.name=constant``: the released fine-tunes ran at a constant lr (their ``sched: linear`` had no
  branch in their scheduler factory, so no scheduler was made); not every supported timm has one.
"""

from __future__ import annotations

from typing import List

import torch
from omegaconf import DictConfig
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from .config import plain_dict


def is_rpb(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "rpb"


def weight_decay_exempt(model: torch.nn.Module, decay_rpb: bool) -> set:
    """Names of the parameters kept out of weight decay besides timm's 1-d/bias rule."""
    names = set(getattr(model, "no_weight_decay", lambda: set())())
    return {n for n in names if not is_rpb(n)} if decay_rpb else names


def param_groups(model: torch.nn.Module, weight_decay: float, decay_rpb: bool, layer_decay=None) -> List[dict]:
    """timm's parameter groups (no decay for 1-d params, biases and the exempt names; optional layer decay)."""
    exempt = weight_decay_exempt(model, decay_rpb)
    if layer_decay is not None:
        return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                        no_weight_decay_list=exempt)
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=exempt)


def build_optimizer(model: torch.nn.Module, optim: DictConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.weight_decay, bool(optim.get("decay_rpb", False)), optim.get("layer_decay"))
    # Every group carries its own weight_decay; the argument only fills groups that lack one (none do).
    return create_optimizer_v2(groups, opt=optim.name, lr=lr, weight_decay=optim.weight_decay,
                               **plain_dict(optim.get("kwargs")))


class ConstantLRScheduler(Scheduler):
    """The base lr throughout, after an optional linear warmup from ``warmup_lr_init`` over ``warmup_t`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_t: int = 0, warmup_lr_init: float = 0.0,
                 t_in_epochs: bool = True):
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values] if warmup_t else []
        if warmup_t:
            self.update_groups(warmup_lr_init)

    def _get_lr(self, t: int) -> List[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * step for step in self.warmup_steps]
        return list(self.base_values)


def build_scheduler(optimizer: torch.optim.Optimizer, sched: DictConfig, updates_per_epoch: int):
    """A timm-protocol scheduler and the number of epochs to run (decay epochs + cooldown)."""
    total_epochs = sched.epochs + sched.cooldown_epochs
    if sched.name == "constant":
        steps = updates_per_epoch if sched.per_step else 1
        scheduler = ConstantLRScheduler(optimizer, warmup_t=int(sched.warmup_epochs * steps),
                                        warmup_lr_init=sched.warmup_lr, t_in_epochs=not sched.per_step)
        return scheduler, total_epochs
    unknown = ValueError(f"sched.name must be 'constant' or one of timm's schedulers (cosine, poly, step, ...); "
                         f"got {sched.name!r}")
    try:
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched=sched.name, num_epochs=sched.epochs, warmup_epochs=sched.warmup_epochs,
            cooldown_epochs=sched.cooldown_epochs, warmup_lr=sched.warmup_lr, min_lr=sched.min_lr,
            decay_rate=sched.get("decay_rate", 0.1), step_on_epochs=not sched.per_step,
            updates_per_epoch=updates_per_epoch)
    except ValueError as err:  # newer timm rejects unknown names itself; older ones return no scheduler
        if "unknown" not in str(err).lower():
            raise
        raise unknown from err
    if scheduler is None:
        raise unknown
    return scheduler, total_epochs
