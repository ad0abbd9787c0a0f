"""eval.py: reproduces the training run's validation accuracy from a checkpoint, loads weight files
through timm (pretrained_cfg_overlay), measures throughput, and rejects inconsistent requests."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.test_train import CONFIGS, NUM_CLASSES, REPO, TINY_MODEL, compose_train, make_image_folder, train_overrides
from dinat.training import run_eval, train
from dinat.training.checkpoint import load


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    images = make_image_folder(tmp_path_factory.mktemp("images"))
    run_dir = tmp_path_factory.mktemp("run")
    summary = train(compose_train(train_overrides(images, run_dir, "sched.epochs=1", "sched.warmup_epochs=0")))
    return {"images": images, "summary": summary}


def data_overrides(images) -> list[str]:
    return ["data=imagenet", f"data.root={images}", f"data.num_classes={NUM_CLASSES}", "data.img_size=32",
            "data.crop_pct=1.0"]


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("eval", overrides=overrides)


def test_eval_py_on_the_checkpoint_reports_the_training_accuracy(trained):
    summary = trained["summary"]
    out = subprocess.run([sys.executable, "eval.py", f"checkpoint={summary['best_checkpoint']}",
                          *data_overrides(trained["images"]), "device=cpu", "workers=0", "progress_bar=false",
                          f"hydra.run.dir={trained['images'].parent / 'eval_run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"(\d+) images \| top-1 ([\d.]+)% \| top-5 ([\d.]+)% \| loss ([\d.]+)", out.stdout)
    assert match, out.stdout
    count, top1, top5, loss = int(match[1]), float(match[2]), float(match[3]), float(match[4])
    assert count == 4 * NUM_CLASSES
    assert top1 == pytest.approx(summary["best"]["top1"], abs=0.005)
    assert top5 == pytest.approx(summary["metrics"]["val/top5"], abs=0.005)
    assert loss == pytest.approx(summary["metrics"]["val/loss"], abs=1e-4)


def test_weights_file_through_timm_and_throughput(trained, tmp_path):
    """A plain state-dict file (as original/HF weights are) loaded via pretrained_cfg_overlay=dict(file=...)."""
    weights = tmp_path / "weights.pth"
    torch.save(load(trained["summary"]["best_checkpoint"])["model"], weights)
    cfg = compose_eval([*data_overrides(trained["images"]), *TINY_MODEL, f"weights={weights}", "device=cpu",
                        "workers=0", "progress_bar=false", "throughput.enabled=true", "throughput.batch_size=4",
                        "throughput.warmup_steps=1", "throughput.steps=2"])
    metrics = run_eval(cfg)
    assert metrics["top1"] == pytest.approx(trained["summary"]["best"]["top1"], abs=1e-9)
    assert metrics["img_per_s"] > 0 and metrics["throughput_batch_size"] == 4


def test_inconsistent_requests_are_rejected(trained, tmp_path):
    checkpoint = trained["summary"]["best_checkpoint"]
    base = [*data_overrides(trained["images"]), "device=cpu", "workers=0", "progress_bar=false"]
    with pytest.raises(ValueError, match="either checkpoint= .* or weights="):
        run_eval(compose_eval([*base, f"checkpoint={checkpoint}", f"weights={checkpoint}"]))
    with pytest.raises(ValueError, match="data.num_classes=7 but the checkpoint was trained with data.num_classes=3"):
        run_eval(compose_eval([*base, f"checkpoint={checkpoint}", "data.num_classes=7"]))
    with pytest.raises(ValueError, match="use_ema=true but checkpoint"):
        run_eval(compose_eval([*base, f"checkpoint={checkpoint}", "use_ema=true"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(compose_eval([*base, f"checkpoint={tmp_path / 'missing.pt'}"]))
