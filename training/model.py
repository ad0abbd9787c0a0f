"""Model construction through timm's registry (``import dinat`` registers the NAT/DiNAT family)."""

from __future__ import annotations

import importlib
import logging

import timm
import torch
from omegaconf import DictConfig

from .config import plain_dict

log = logging.getLogger(__name__)


def register_project_models() -> None:
    """Import the project's ``models`` package so its variants exist in timm's registry."""
    try:
        importlib.import_module("dinat.models")
    except ModuleNotFoundError as err:
        if err.name != "dinat.models":  # models exists but one of its own imports failed: show that
            raise


def create_model_kwargs(model_cfg: DictConfig, num_classes: int, in_chans: int) -> dict:
    """Keyword arguments for ``timm.create_model``; null entries mean "the variant's own default"."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if model_cfg.get("drop_path_rate") is not None:
        kwargs["drop_path_rate"] = float(model_cfg.drop_path_rate)
    for key, value in plain_dict(model_cfg.get("kwargs")).items():
        if value is not None:
            # YAML lists become tuples: the models take per-level tuples (e.g. dilations).
            kwargs[key] = _to_tuples(value)
    return kwargs


def _to_tuples(value):
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def build_model(model_cfg: DictConfig, num_classes: int, in_chans: int = 3,
                pretrained_file: str | None = None, pretrained_num_classes: int | None = None) -> torch.nn.Module:
    """``timm.create_model(model.timm_model, ...)``; ``pretrained_file`` loads original/HF weights through timm.

    ``pretrained_num_classes``: the classes of the file's head, when they differ from the variant's
    pretrained config (e.g. 21841 for ImageNet-22k weights); timm then leaves the head out.
    """
    register_project_models()
    # Checkpoints written before the rename to ``timm_model`` saved it as ``model.name``.
    name = str(model_cfg.timm_model if "timm_model" in model_cfg else model_cfg.name)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:12]
        raise ValueError(f"model.timm_model={name!r} is not a registered timm model; similar names: {close}")
    kwargs = create_model_kwargs(model_cfg, num_classes, in_chans)
    if pretrained_file:
        overlay = {"file": str(pretrained_file)}
        if pretrained_num_classes:
            overlay["num_classes"] = int(pretrained_num_classes)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    return timm.create_model(name, **kwargs)
