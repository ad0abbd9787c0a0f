"""The Hydra configs themselves: what train.yaml and eval.yaml share, and the optional site-local group."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dinat.training.model import build_model, register_project_models

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# configs/runtime/default.yaml, as both entry configs resolve it (eval.yaml keeps fp32 by default).
RUNTIME = {"device": "auto", "amp": "auto", "workers": 2, "channels_last": False, "compile": False,
           "progress_bar": True}


def compose_entry(config_dir: Path, entry: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(entry, overrides=list(overrides), return_hydra_config=True)


def own_keys(path: Path) -> set[str]:
    return set(yaml.safe_load(path.read_text())) - {"defaults", "hydra"}


def test_runtime_settings_are_written_once_and_shared_by_train_and_eval():
    runtime_keys = own_keys(CONFIGS / "runtime" / "default.yaml")
    assert runtime_keys == set(RUNTIME)
    assert not runtime_keys & own_keys(CONFIGS / "train.yaml")
    assert runtime_keys & own_keys(CONFIGS / "eval.yaml") == {"amp"}  # evaluation's default: fp32
    train, evaluation = compose_entry(CONFIGS, "train"), compose_entry(CONFIGS, "eval")
    assert {k: train[k] for k in RUNTIME} == RUNTIME
    assert {k: evaluation[k] for k in RUNTIME} == {**RUNTIME, "amp": "none"}
    assert train.hydra.job.chdir is False and evaluation.hydra.job.chdir is False
    # command-line overrides reach the shared keys by their top-level names, in both
    for entry in ("train", "eval"):
        cfg = compose_entry(CONFIGS, entry, ["device=cpu", "workers=0", "amp=bf16", "compile=true"])
        assert (cfg.device, cfg.workers, cfg.amp, cfg.compile) == ("cpu", 0, "bf16", True)


def site_configs(tmp_path: Path, local_file: Path | None) -> Path:
    """A copy of configs/ whose local/default.yaml is ``local_file`` (or absent), whatever this checkout has."""
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    local = configs / "local" / "default.yaml"
    local.unlink(missing_ok=True)
    if local_file is not None:
        shutil.copy(local_file, local)
    return configs


def test_without_a_local_file_nothing_site_specific_is_set(tmp_path):
    configs = site_configs(tmp_path, None)
    for entry in ("train", "eval"):
        cfg = compose_entry(configs, entry, ["data=imagenet", "hydra/launcher=slurm"])
        assert "site" not in cfg
        assert cfg.data.root is None  # check_common then asks for data.root by name
        assert (cfg.hydra.launcher.account, cfg.hydra.launcher.partition, cfg.hydra.launcher.qos) == (None,) * 3
    assert compose_entry(configs, "train").data.root == "data/digits_32px"


def test_a_local_file_supplies_data_roots_and_slurm_account_and_the_command_line_still_wins(tmp_path):
    configs = site_configs(tmp_path, CONFIGS / "local" / "example.yaml")
    for entry in ("train", "eval"):
        cfg = compose_entry(configs, entry, ["data=imagenet", "hydra/launcher=slurm"])
        assert cfg.data.root == "/datasets/imagenet"
        assert (cfg.hydra.launcher.account, cfg.hydra.launcher.partition) == ("my_account", "gpu")
        cfg = compose_entry(configs, entry, ["data=imagenet", "data.root=/elsewhere", "hydra/launcher=slurm",
                                             "hydra.launcher.account=other"])
        assert (cfg.data.root, cfg.hydra.launcher.account) == ("/elsewhere", "other")
    # an experiment's data=imagenet picks the site's root up too; the digits demo keeps its own
    assert compose_entry(configs, "train", ["experiment=dinat_mini_in1k"]).data.root == "/datasets/imagenet"
    assert compose_entry(configs, "train").data.root == "data/digits_32px"


def test_model_configs_name_their_file_and_their_timm_model_apart():
    register_project_models()
    for path in sorted((CONFIGS / "model").glob("*.yaml")):
        cfg = compose_entry(CONFIGS, "train", [f"model={path.stem}"])
        assert cfg.model.config_name == path.stem
        assert timm.is_model(cfg.model.timm_model), path.stem
        assert cfg.name == f"{path.stem}_digits"
    assert compose_entry(CONFIGS, "train").model.timm_model == "dinat_mini"  # the demo's dinat_nano resizes it
    with pytest.raises(ConfigCompositionException, match="model.name"):  # the old key is gone, loudly
        compose_entry(CONFIGS, "train", ["model.name=dinat_tiny"])


def test_checkpoints_from_before_the_rename_still_build_their_model():
    saved = OmegaConf.create({"variant": "dinat_nano", "name": "dinat_mini", "drop_path_rate": 0.0,
                              "kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "kernel_size": 3,
                                         "dilations": [[1], [1], [1], [1]]}})
    model = build_model(saved, num_classes=3, in_chans=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
