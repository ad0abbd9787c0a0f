"""Datasets and loaders, built from timm's readers and transforms.

``data.dataset`` is passed to ``timm.data.create_dataset``: ``""`` reads an image folder
(``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) or a tar of one; ``"wds/..."``,
``"hfds/..."``, ``"tfds/..."`` select timm's other readers. The digits demo renders scikit-learn's
bundled 8x8 digits into such a folder once (no network).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing

from . import distributed
from .config import plain_dict

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the digits demo set
def render_digits(root: str | os.PathLike, img_size: int, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write sklearn's 1,797 8x8 digits as ``img_size`` PNGs in ``root/{train,val}/<digit>/``.

    Built in a temporary sibling directory and renamed into place, so an interrupted or concurrent
    render never leaves a half-written folder behind.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    digits = load_digits()
    # Pixel values are 0..16; stretch to 0..255 and upscale smoothly so the patch embedding sees shapes.
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in idx:
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(images[i], mode="L").resize((img_size, img_size), Image.BICUBIC)
                img.save(folder / f"{i:04d}.png")
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "train").is_dir():  # someone else finished first: theirs is identical
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("rendered the digits demo set (%d train, %d val) at %s", len(train_idx), len(val_idx), root)
    return root


def prepare(data_cfg: DictConfig, dist_env: distributed.DistEnv) -> None:
    """Render the demo data when the config asks for it (rank 0 only), then check the root exists."""
    root = Path(str(data_cfg.root)).expanduser()
    if data_cfg.get("render") == "digits":
        if dist_env.is_main:
            render_digits(root, int(data_cfg.img_size))
        distributed.barrier()
    if str(data_cfg.dataset):  # timm's other readers (wds/, hfds/, tfds/) check their own sources
        return
    layout = (f"it must be a folder with {data_cfg.train_split}/ and {data_cfg.val_split}/ class sub-folders "
              f"(or set data.dataset to one of timm's readers: wds/..., hfds/..., tfds/...)")
    if not root.exists():
        raise FileNotFoundError(f"data.root={str(data_cfg.root)!r} does not exist; {layout}")
    if root.is_dir():
        for split in (data_cfg.train_split, data_cfg.val_split):
            if not (root / str(split)).exists():
                raise FileNotFoundError(f"data.root={str(data_cfg.root)!r} has no {split!r} entry; {layout}")


# ----------------------------------------------------------------------------- transforms
def model_data_config(model: torch.nn.Module, data_cfg: DictConfig) -> dict:
    """The model's own preprocessing (mean/std/interpolation/crop_pct), overridden by non-null data.* keys."""
    overrides = {"in_chans": int(data_cfg.in_chans), "img_size": data_cfg.get("img_size")}
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if data_cfg.get(key) is not None:
            value = data_cfg[key]
            overrides[key] = tuple(value) if key in ("mean", "std") else value
    config = resolve_data_config(overrides, model=model)
    # img_size null takes the model's input size; the channel count is always data.in_chans.
    config["input_size"] = (int(data_cfg.in_chans), *config["input_size"][1:])
    return config


def train_transform(data_config: dict, aug: DictConfig):
    """Per-image augmentation. Random erasing is not here: it runs on the batch after mixup (see below)."""
    return create_transform(
        input_size=data_config["input_size"], is_training=True,
        scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=aug.vflip,
        color_jitter=aug.color_jitter, auto_augment=aug.auto_augment or None,
        interpolation=aug.train_interpolation or data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], re_prob=0.0)


def batch_random_erasing(aug: DictConfig, device: torch.device) -> Optional[RandomErasing]:
    """Random erasing for a normalised batch, applied after mixup/cutmix.

    That is the released order: timm's prefetching loader (on by default in the authors' train.py)
    mixes in the collate function and erases afterwards, per image, on the GPU batch.
    """
    if aug.re_prob <= 0:
        return None
    return RandomErasing(probability=aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device=device)


def eval_transform(data_config: dict):
    """Resize to ``img_size / crop_pct`` and centre-crop, as the published evaluations do."""
    return create_transform(
        input_size=data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])


# ----------------------------------------------------------------------------- datasets and loaders
def build_dataset(data_cfg: DictConfig, split: str, is_training: bool, transform, batch_size: int = 1):
    dataset = create_dataset(
        str(data_cfg.dataset), root=str(Path(str(data_cfg.root)).expanduser()), split=split,
        is_training=is_training, batch_size=batch_size, input_img_mode="RGB" if data_cfg.in_chans == 3 else "L",
        **plain_dict(data_cfg.get("dataset_kwargs")))
    dataset.transform = transform
    if not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) == 0:
        raise ValueError(f"data: split {split!r} under data.root={str(data_cfg.root)!r} holds no images")
    return dataset


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: no padding, so metrics summed over ranks are exact."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_loader(dataset, batch_size: int, workers: int, dist_env: distributed.DistEnv, seed: int,
                 pin_memory: bool) -> torch.utils.data.DataLoader:
    """Shuffled, ``drop_last`` loader whose order and worker seeds depend only on (seed, epoch, rank).

    Call :func:`set_epoch` before iterating each epoch. The per-epoch determinism is what lets a
    resumed run replay an interrupted epoch exactly.
    """
    sampler = None
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=dist_env.world_size, rank=dist_env.rank, shuffle=True, seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=True, persistent_workers=False, generator=torch.Generator())


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int, seed: int, rank: int) -> None:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    # Worker seeds are drawn from this generator when the epoch's iterator is created.
    loader.generator.manual_seed(((seed * 1_000_003 + epoch) * 1_009 + rank) % 2**63)


def eval_loader(dataset, batch_size: int, workers: int, dist_env: distributed.DistEnv,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    sampler = None
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        sampler = ShardSampler(len(dataset), dist_env.rank, dist_env.world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=False)
