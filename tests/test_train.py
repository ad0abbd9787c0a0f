"""train.py / training package on CPU: configs, a short run, exact resume, preemption, DDP, wandb, errors.

Everything runs on a tiny synthetic image folder (built here) with a tiny DiNAT at 32x32.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from dinat import models  # noqa: F401  (registers the DiNAT family in timm)
from dinat.training import PREEMPTED_EXIT_CODE, PreemptionHandler, train
from dinat.training.checkpoint import load
from dinat.training.config import check_train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
NUM_CLASSES = 3

# A DiNAT with DiNAT's structure at toy size: feature maps 8, 4, 2, 1 for 32x32 inputs.
TINY_MODEL = ["model=dinat_nano", "model.kwargs.embed_dim=16", "model.kwargs.depths=[1,1,2,1]",
              "model.kwargs.num_heads=[1,2,4,8]", "model.kwargs.dilations=[[1],[1],[1,2],[1]]"]


def make_image_folder(root: Path, per_class_train: int = 8, per_class_val: int = 4, size: int = 32) -> Path:
    """Classes that differ in where a bright square sits, plus noise: learnable, but not instantly."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c in range(NUM_CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                y0 = 4 + 8 * c
                img[y0:y0 + 8, 10:22] = 220
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def train_overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["data=imagenet", f"data.root={data_root}", f"data.num_classes={NUM_CLASSES}", "data.img_size=32",
            "data.crop_pct=1.0", *TINY_MODEL, "batch_size=4", "workers=0", "device=cpu", "amp=none",
            "sched.epochs=2", "sched.warmup_epochs=1", "optim.lr=1e-3", "progress_bar=false",
            "data.aug.auto_augment=rand-m9-mstd0.5-inc1", "data.aug.re_prob=0.25",  # exercise the RNG paths
            f"run_dir={run_dir}", *extra]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def model_state(path: Path) -> dict:
    return load(path)["model"]


# ------------------------------------------------------------------------------------------- configs
def tiny_kwargs(name: str) -> dict:
    if "isotropic" in name or name.startswith("vitrpb"):
        kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        if not name.startswith("vitrpb"):
            kwargs.update(kernel_size=3, dilations=(1, 1))
        return kwargs
    return dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3,
                dilations=((1,), (1,), (1, 2), (1,)))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_composes_checks_and_builds(experiment):
    cfg = compose_train([f"experiment={experiment}", "data.root=/data/imagenet", "finetune_from=/w/in22k.pth",
                         "run_dir=/runs/x"])
    assert not OmegaConf.missing_keys(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    check_train(cfg)
    assert cfg.name == experiment and cfg.data.num_classes == 1000
    assert cfg.model.timm_model == cfg.model.config_name and timm.is_model(cfg.model.timm_model)
    # The recipe values themselves are checked against the released ones in tests/test_recipes.py.
    model = timm.create_model(cfg.model.timm_model, num_classes=10, **tiny_kwargs(cfg.model.timm_model))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_every_registered_variant_has_a_model_config():
    names = {p.stem for p in (CONFIGS / "model").glob("*.yaml")}
    variants = set(timm.list_models(["nat_*", "dinat_*", "vitrpb_*"]))
    assert variants - {"dinat_nano"} <= names, variants - names
    for stem in names:
        cfg = compose_train([f"model={stem}"])
        assert timm.is_model(cfg.model.timm_model), stem


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def uninterrupted_run(image_folder, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("run_a")
    summary = train(compose_train(train_overrides(image_folder, run_dir)))
    return {"summary": summary, "run_dir": run_dir}


def test_short_run_writes_checkpoints_and_metrics(uninterrupted_run):
    summary, run_dir = uninterrupted_run["summary"], uninterrupted_run["run_dir"]
    assert summary["preempted"] is None and summary["epochs"] == 2
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    assert Path(summary["checkpoint"]) == last and last.is_file() and best.is_file()
    state = torch.load(last, weights_only=True)  # loadable without unpickling code
    assert state["position"] == {"epoch": 2, "batches_done": 0, "update": 2 * 6}  # 24 images / batch 4
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config", "best", "metrics"):
        assert state[key] is not None, key
    assert state["config"]["batch_size"] == 4 and state["config"]["run_dir"] == str(run_dir)  # resolved config
    metrics = summary["metrics"]
    assert 0.0 <= metrics["val/top1"] <= 100.0 and np.isfinite(metrics["val/loss"])
    assert metrics["val/top1"] == state["metrics"]["val/top1"]
    assert not list(run_dir.glob("checkpoints/.*tmp*"))  # no temporary files left behind


def test_preemption_signal_saves_and_resume_is_bit_identical(uninterrupted_run, image_folder, tmp_path):
    """SIGUSR1 mid-epoch 2 -> checkpoint -> resume=auto in a new call -> same weights as never stopping."""
    overrides = train_overrides(image_folder, tmp_path)

    def preempt_at_update_8(pos):
        if pos.update == 8:
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, handled like a cluster's preemption

    stopped = train(compose_train(overrides), on_update=preempt_at_update_8)
    assert stopped["preempted"] == "SIGUSR1"
    state = load(tmp_path / "checkpoints" / "last.pt")
    # noticed at the next update boundary (the stop flag is read before on_update runs)
    assert state["position"] == {"epoch": 1, "batches_done": 3, "update": 9}

    resumed = train(compose_train(overrides))  # resume=auto is the default
    assert resumed["preempted"] is None
    expected = model_state(uninterrupted_run["run_dir"] / "checkpoints" / "last.pt")
    got = model_state(tmp_path / "checkpoints" / "last.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed["metrics"]["val/top1"] == uninterrupted_run["summary"]["metrics"]["val/top1"]


def test_crash_without_warning_resumes_from_the_epoch_checkpoint_bit_identically(uninterrupted_run, image_folder,
                                                                                 tmp_path):
    """A hard failure mid-epoch 2 (nothing saved then) -> resume=auto from epoch 1's checkpoint -> same weights."""
    overrides = train_overrides(image_folder, tmp_path)

    class Crash(Exception):
        pass

    def crash_at_update_9(pos):
        if pos.update == 9:
            raise Crash

    with pytest.raises(Crash):
        train(compose_train(overrides), on_update=crash_at_update_9)
    assert load(tmp_path / "checkpoints" / "last.pt")["position"] == {"epoch": 1, "batches_done": 0, "update": 6}
    train(compose_train(overrides))
    expected = model_state(uninterrupted_run["run_dir"] / "checkpoints" / "last.pt")
    got = model_state(tmp_path / "checkpoints" / "last.pt")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_handler_passes_signal_on_to_previous_handler_then_exits():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        handler = PreemptionHandler(["SIGUSR2"]).install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.requested and not calls  # ours only records it
        with pytest.raises(SystemExit) as exit_info:
            handler.exit()
        assert calls == [signal.SIGUSR2] and exit_info.value.code == PREEMPTED_EXIT_CODE
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_nonfinite_loss_stops_without_writing_a_checkpoint(image_folder, tmp_path):
    cfg = compose_train(train_overrides(image_folder, tmp_path, "optim.lr=1e30", "sched.warmup_epochs=0",
                                        "label_smoothing=0.0"))
    with pytest.raises(FloatingPointError, match="not finite"):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_wandb_offline_run_directory(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train(train_overrides(image_folder, tmp_path, "logger=wandb", "logger.mode=offline",
                                        "sched.epochs=1", "sched.warmup_epochs=0"))
    train(cfg)
    run_id = load(tmp_path / "checkpoints" / "last.pt")["wandb_run_id"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert run_id and [r.name.endswith(run_id) for r in runs] == [True]
    # Resuming (one more epoch) continues the same wandb run.
    cfg.sched.epochs = 2
    train(cfg)
    assert load(tmp_path / "checkpoints" / "last.pt")["wandb_run_id"] == run_id
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


# ------------------------------------------------------------------------------------------- errors
def test_bad_values_and_missing_dataset_give_clear_errors(image_folder, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        train(compose_train(train_overrides(image_folder, tmp_path, "batch_size=0")))
    with pytest.raises(ValueError, match="amp must be one of"):
        train(compose_train(train_overrides(image_folder, tmp_path, "amp=fp8")))
    with pytest.raises(ValueError, match="batch_size must be even"):
        train(compose_train(train_overrides(image_folder, tmp_path, "batch_size=3", "data.aug.mixup=0.8")))
    with pytest.raises(FileNotFoundError, match="data.root='/no/such/dataset' does not exist"):
        train(compose_train(train_overrides(Path("/no/such/dataset"), tmp_path)))
    with pytest.raises(FileNotFoundError, match="has no 'train' entry"):
        train(compose_train(train_overrides(image_folder / "train", tmp_path)))
    with pytest.raises(Exception, match="data.root"):  # data=imagenet without data.root
        train(compose_train(["data=imagenet", "device=cpu"]))


def test_unknown_config_key_is_rejected_by_name():
    out = subprocess.run([sys.executable, "train.py", "no_such_key=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "no_such_key" in out.stderr and "not in struct" in out.stderr


# ------------------------------------------------------------------------------------------- DDP
def test_two_process_ddp_on_gloo_trains_and_replicas_agree(image_folder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *train_overrides(image_folder, tmp_path, "sched.epochs=1", "sched.warmup_epochs=0", "batch_size=2"),
           f"hydra.run.dir={tmp_path}"]
    cmd.remove(f"run_dir={tmp_path}")  # train.yaml's run_dir follows hydra.run.dir
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = out.stdout + out.stderr + (tmp_path / "train.log").read_text()
    assert "the weights of all 2 replicas agree" in logs
    state = load(tmp_path / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]["current"]) == 2
    # 24 images / (2 processes x batch 2) = 6 updates in the epoch
    assert state["position"] == {"epoch": 1, "batches_done": 0, "update": 6}


# ------------------------------------------------------------------------------------------- numerics
def test_gradient_accumulation_matches_the_larger_batch(image_folder, tmp_path):
    """2 micro-batches of 2 per update = 1 batch of 4: same samples, same mean loss, same updates."""
    common = ["sched.epochs=1", "sched.warmup_epochs=0", "data.aug.auto_augment=null", "data.aug.re_prob=0.0"]
    train(compose_train(train_overrides(image_folder, tmp_path / "big", *common, "batch_size=4")))
    train(compose_train(train_overrides(image_folder, tmp_path / "accum", *common, "batch_size=2",
                                        "grad_accum_steps=2")))
    big = model_state(tmp_path / "big" / "checkpoints" / "last.pt")
    accum = model_state(tmp_path / "accum" / "checkpoints" / "last.pt")
    assert load(tmp_path / "accum" / "checkpoints" / "last.pt")["position"]["update"] == 6
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=1e-4, atol=1e-5, msg=key)


def test_bf16_autocast_and_ema_run_on_cpu(image_folder, tmp_path):
    summary = train(compose_train(train_overrides(image_folder, tmp_path, "amp=bf16", "ema.enabled=true",
                                                  "ema.decay=0.9", "channels_last=true", "clip_grad=1.0",
                                                  "sched.epochs=1", "sched.warmup_epochs=0")))
    assert np.isfinite(summary["metrics"]["val/loss"]) and "val_ema/top1" in summary["metrics"]
    state = load(tmp_path / "checkpoints" / "last.pt")
    # As the released train.py: with EMA on, the best checkpoint is chosen by the EMA weights' accuracy.
    assert summary["best"] == {"top1": summary["metrics"]["val_ema/top1"], "epoch": 1, "weights": "ema"}
    assert state["ema"].keys() == state["model"].keys()
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])


def test_two_slurm_tasks_join_from_slurm_environment(image_folder, tmp_path):
    """What srun (and the submitit launcher) gives each task: SLURM_* variables only, no RANK/WORLD_SIZE."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = train_overrides(image_folder, tmp_path, "sched.epochs=1", "sched.warmup_epochs=0", "batch_size=2")
    overrides.remove(f"run_dir={tmp_path}")
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base_env.update(OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                    SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    tasks = [subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                              env=dict(base_env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "the weights of all 2 replicas agree" in outputs[0]
    state = load(tmp_path / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["position"]["update"] == 6


def test_slurm_launcher_config_runs_one_task_per_gpu():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                          "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes, launcher.signal_delay_s) == (4, 2, 120)
