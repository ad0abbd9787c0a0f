"""Every experiment= against the released recipes, value by value, and the training-side behaviours
that reproduce them (constant fine-tune lr, decayed RPB, erasing after mixup, fp32 evaluation).

The tables below were written from the authors' released code, SHI-Labs/Neighborhood-Attention-Transformer
(classification/train.py defaults, classification/configs/*.yml, the variants' drop-path defaults) and
timm 0.5.0 (the version classification/requirements.txt pins); docs/training.md gives file:line for each.
A change that drifts from them fails here, unless it is one of the documented deliberate differences.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

from tests.test_train import CONFIGS, EXPERIMENTS, REPO, compose_train
from dinat.training import distributed
from dinat.training.loop import Parts, Position, train_one_epoch
from dinat.training.optim import ConstantLRScheduler, build_scheduler, param_groups
from dinat.training.trainer import scaled_lr

# Their train.py's argparse defaults (timm 0.5.0 for the interpolation/mean/std a model without a
# default_cfg gets), as our config keys. amp and sched depend on the YAML: see released_values().
TRAIN_PY_DEFAULTS = {
    "optim.name": "adamw", "optim.kwargs.eps": 1e-8, "optim.kwargs.betas": [0.9, 0.999],
    "optim.weight_decay": 0.05, "clip_grad": 5.0,
    "optim.lr": 1e-3, "sched.warmup_lr": 1e-6, "sched.min_lr": 5e-6, "sched.epochs": 300,
    "sched.warmup_epochs": 20, "sched.cooldown_epochs": 0, "sched.per_step": True,
    "data.aug.scale": [0.08, 1.0], "data.aug.ratio": [3 / 4, 4 / 3], "data.aug.hflip": 0.5, "data.aug.vflip": 0.0,
    "data.aug.color_jitter": 0.4, "data.aug.auto_augment": "rand-m9-mstd0.5-inc1",
    "data.aug.re_prob": 0.25, "data.aug.re_mode": "pixel", "data.aug.re_count": 1,
    "data.aug.mixup": 0.8, "data.aug.cutmix": 1.0, "data.aug.mixup_prob": 1.0, "data.aug.mixup_switch_prob": 0.5,
    "data.aug.mixup_mode": "batch", "label_smoothing": 0.1, "data.aug.train_interpolation": "random",
    "ema.enabled": False, "ema.decay": 0.9998, "seed": 42, "workers": 8, "batch_size": 128,
    "eval_batch_size": None, "data.img_size": 224, "data.crop_pct": 0.875,
    "data.interpolation": "bicubic", "data.mean": [0.485, 0.456, 0.406], "data.std": [0.229, 0.224, 0.225],
}

# configs/<yml>: the keys each sets. The 300-epoch ones all set lr 1e-3, warmup_lr 1e-6, min_lr 5e-6,
# epochs 300, cooldown 10, amp True, batch 128, sched cosine, sched_epochwise False, wd 0.05.
SCRATCH = {"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 5e-6, "epochs": 300, "cooldown_epochs": 10, "amp": True,
           "batch_size": 128, "sched": "cosine", "weight_decay": 0.05}
FINETUNE = {"lr": 5e-5, "cooldown_epochs": 0, "warmup_epochs": 0, "epochs": 30, "amp": False, "batch_size": 64,
            "sched": "linear", "cutmix": 0.0, "mixup": 0.0, "mixup_prob": 0.0}
RELEASED_YAMLS = {  # our experiment: (their yml, its keys, the variant's drop_path_rate default)
    "nat_mini_in1k": ("nat_mini.yml", dict(SCRATCH, model="nat_mini", warmup_epochs=20), 0.2),
    "nat_tiny_in1k": ("nat_tiny.yml", dict(SCRATCH, model="nat_tiny", warmup_epochs=20), 0.2),
    "nat_small_in1k": ("nat_small.yml", dict(SCRATCH, model="nat_small", warmup_epochs=20), 0.3),
    "nat_base_in1k": ("nat_base.yml", dict(SCRATCH, model="nat_base", warmup_epochs=20), 0.5),
    "dinat_mini_in1k": ("dinat_mini.yml", dict(SCRATCH, model="dinat_mini", warmup_epochs=20), 0.2),
    "dinat_tiny_in1k": ("dinat_tiny.yml", dict(SCRATCH, model="dinat_tiny", warmup_epochs=20), 0.2),
    "dinat_small_in1k": ("dinat_small.yml", dict(SCRATCH, model="dinat_small", warmup_epochs=20), 0.3),
    "dinat_base_in1k": ("dinat_base.yml", dict(SCRATCH, model="dinat_base", warmup_epochs=20), 0.5),
    "dinat_s_tiny_in1k": ("dinat_s_tiny.yml", dict(SCRATCH, model="dinat_s_tiny", warmup_epochs=20), 0.2),
    "dinat_s_small_in1k": ("dinat_s_small.yml", dict(SCRATCH, model="dinat_s_small", warmup_epochs=20), 0.3),
    "dinat_s_base_in1k": ("dinat_s_base.yml", dict(SCRATCH, model="dinat_s_base", warmup_epochs=20), 0.5),
    "vitrpb_small_in1k": ("vit_rpb_small.yml", dict(SCRATCH, model="vitrpb_small", warmup_epochs=20), 0.1),
    "nat_isotropic_small_in1k": ("nat_isotropic_small.yml",
                                 dict(SCRATCH, model="nat_isotropic_small", warmup_epochs=20), 0.1),
    "dinat_isotropic_small_in1k": ("dinat_isotropic_small.yml",
                                   dict(SCRATCH, model="dinat_isotropic_small", warmup_epochs=20), 0.1),
    "vitrpb_base_in1k": ("vit_rpb_base.yml", dict(SCRATCH, model="vitrpb_base", model_ema=True, warmup_epochs=50),
                         0.4),
    "nat_isotropic_base_in1k": ("nat_isotropic_base.yml",
                                dict(SCRATCH, model="nat_isotropic_base", model_ema=True, warmup_epochs=50), 0.4),
    "dinat_isotropic_base_in1k": ("dinat_isotropic_base.yml",
                                  dict(SCRATCH, model="dinat_isotropic_base", model_ema=True, warmup_epochs=50), 0.4),
    "dinat_large_in22k_ft_in1k_224": ("dinat_large.yml",
                                      dict(FINETUNE, model="dinat_large", weight_decay=1e-4, img_size=224), 0.35),
    "dinat_large_in22k_ft_in1k_384": ("dinat_large_384.yml", dict(FINETUNE, model="dinat_large_384",
                                      weight_decay=1e-10, img_size=384, crop_pct=1.0), 0.35),
    # Their file says model: dinat_large (a copy of dinat_large.yml but for the name); we follow the file
    # name and DiNAT.md, which list it as DiNAT_s-Large's config (docs/training.md).
    "dinat_s_large_in22k_ft_in1k_224": ("dinat_s_large.yml",
                                        dict(FINETUNE, model="dinat_large", weight_decay=1e-4, img_size=224), 0.35),
    "dinat_s_large_in22k_ft_in1k_384": ("dinat_s_large_384.yml", dict(FINETUNE, model="dinat_s_large_384",
                                        weight_decay=1e-5, img_size=384, crop_pct=1.0), 0.35),
}
# Their YAML keys as our config keys (sched, amp and model are handled in released_values()).
YAML_KEYS = {"lr": "optim.lr", "warmup_lr": "sched.warmup_lr", "min_lr": "sched.min_lr", "epochs": "sched.epochs",
             "cooldown_epochs": "sched.cooldown_epochs", "warmup_epochs": "sched.warmup_epochs",
             "batch_size": "batch_size", "weight_decay": "optim.weight_decay", "model_ema": "ema.enabled",
             "cutmix": "data.aug.cutmix", "mixup": "data.aug.mixup", "mixup_prob": "data.aug.mixup_prob",
             "img_size": "data.img_size", "crop_pct": "data.crop_pct"}


def released_values(experiment: str) -> dict:
    """The released run's value of every key we check, as our config keys and our value spellings."""
    _, yaml_keys, drop_path = RELEASED_YAMLS[experiment]
    values = dict(TRAIN_PY_DEFAULTS)
    values.update({YAML_KEYS[k]: v for k, v in yaml_keys.items() if k in YAML_KEYS})
    values["model.drop_path_rate"] = drop_path
    values["model.timm_model"] = "dinat_s_large" if experiment.startswith("dinat_s_large_in22k_ft_in1k_224") \
        else yaml_keys["model"]
    # sched: linear made no scheduler in their train.py (a constant lr); cosine is timm's cosine.
    values["sched.name"] = {"cosine": "cosine", "linear": "constant"}[yaml_keys["sched"]]
    if values["sched.name"] == "constant":
        del values["sched.min_lr"]  # unused without a decaying schedule (ours: 0.0, what sched=linear decays to)
    # amp: True = fp16 there; ours runs bf16 (amp=auto) on purpose. amp: False = fp32 in both.
    values["amp"] = "auto" if yaml_keys["amp"] else "none"
    return values


def resolve(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if hasattr(node, "__len__") and not isinstance(node, str) else node


def compose_experiment(experiment: str, *extra: str):
    return compose_train([f"experiment={experiment}", "data.root=/data/imagenet", "run_dir=/runs/x", *extra])


def test_every_released_recipe_has_an_experiment():
    assert sorted(RELEASED_YAMLS) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_reproduces_the_released_values(experiment):
    cfg = compose_experiment(experiment)
    expected = released_values(experiment)
    got = {key: resolve(cfg, key) for key in expected}
    for key in expected:
        if isinstance(expected[key], float):
            assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert {k: v for k, v in got.items() if not isinstance(expected[k], float)} == \
        {k: v for k, v in expected.items() if not isinstance(v, float)}
    # As released: the rpb tables are decayed; the lr is the released one at 8 GPUs (our linear scaling
    # is anchored there), and lr_base_batch_size=null turns scaling off.
    assert cfg.optim.decay_rpb is True
    assert cfg.optim.lr_base_batch_size == 8 * cfg.batch_size
    assert scaled_lr(cfg.optim, 8 * cfg.batch_size) == cfg.optim.lr
    assert scaled_lr(compose_experiment(experiment, "optim.lr_base_batch_size=null").optim, 4 * cfg.batch_size) \
        == cfg.optim.lr


def test_our_alternatives_are_one_switch_away():
    cfg = compose_experiment("dinat_large_in22k_ft_in1k_224", "sched=linear", "optim.decay_rpb=false")
    assert (cfg.sched.name, cfg.sched.decay_rate, cfg.sched.min_lr, cfg.sched.epochs) == ("poly", 1.0, 0.0, 30)
    assert cfg.optim.decay_rpb is False and cfg.optim.lr == 5e-5


def test_cfg_job_prints_the_released_values():
    out = subprocess.run([sys.executable, "train.py", "experiment=dinat_s_large_in22k_ft_in1k_384", "--cfg", "job"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("name: constant", "amp: none", "clip_grad: 5.0", "decay_rpb: true", "weight_decay: 1.0e-05",
                 "train_interpolation: random", "name: dinat_s_large_384", "crop_pct: 1.0"):
        assert line in out.stdout, line


def test_finetune_recipe_requires_the_weights():
    from dinat.training.config import check_train

    with pytest.raises(ValueError, match="finetune_from must be the path of the weights"):
        check_train(compose_experiment("dinat_large_in22k_ft_in1k_224"))


def test_eval_defaults_to_fp32_like_validate_py():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        assert compose("eval").amp == "none"


# ------------------------------------------------------------------------------------------- behaviour
def tiny_dinat():
    import timm

    from dinat import models  # noqa: F401

    return timm.create_model("dinat_mini", num_classes=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                             kernel_size=3, dilations=((1,), (1,), (1,), (1,)))


def test_decay_rpb_puts_the_tables_in_the_decayed_group_as_timm_0_5_did():
    model = tiny_dinat()
    names = {id(p): n for n, p in model.named_parameters()}
    rpb = {n for n in names.values() if n.endswith(".rpb")}
    assert rpb

    def decayed(groups):
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    # timm 0.5's add_weight_decay: no decay for 1-d params and biases, decay for everything else.
    released = {n for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")}
    assert decayed(param_groups(model, 0.05, decay_rpb=True)) == released
    assert decayed(param_groups(model, 0.05, decay_rpb=False)) == released - rpb


def test_constant_schedule_holds_the_lr_and_linear_is_one_switch_away():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for overrides, lrs in ((), [5e-5] * 4), (("sched=linear",), [5e-5, 2.5e-5, 0.0]):
        cfg = compose_experiment("dinat_large_in22k_ft_in1k_224", *overrides)
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
        scheduler, epochs = build_scheduler(optimizer, cfg.sched, updates_per_epoch=10)
        assert epochs == 30
        seen = []
        for update in (0, 150, 300, 400)[:len(lrs)]:
            scheduler.step_update(num_updates=update)
            seen.append(optimizer.param_groups[0]["lr"])
        assert seen == pytest.approx(lrs, abs=1e-12)


def test_constant_scheduler_warmup_and_state_round_trip():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = ConstantLRScheduler(optimizer, warmup_t=4, warmup_lr_init=0.0, t_in_epochs=False)
    assert optimizer.param_groups[0]["lr"] == 0.0
    scheduler.step_update(2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    other = ConstantLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), t_in_epochs=False)
    other.load_state_dict(scheduler.state_dict())
    other.step_update(3)
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.75)
    scheduler.step_update(9)
    assert optimizer.param_groups[0]["lr"] == 1.0


def test_unknown_schedule_is_rejected_by_name():
    cfg = compose_train(["sched.name=nosuch"])
    with pytest.raises(ValueError, match="sched.name must be"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg.sched, 10)


def test_training_step_erases_after_mixing():
    """Constant-mode erasing leaves exact zeros; erased before mixing, the box would hold the partner's pixels."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 16 * 16, 4)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.head(x.flatten(1))

    torch.manual_seed(0)
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter([(1.0 + torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))])
    parts = Parts(model=model, raw_model=model, eval_model=model, optimizer=optimizer,
                  scheduler=ConstantLRScheduler(optimizer, t_in_epochs=False),
                  scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                  mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=4),
                  random_erasing=RandomErasing(probability=1.0, mode="const", device="cpu"),
                  loss_fn=SoftTargetCrossEntropy(), device=torch.device("cpu"), amp_dtype=None,
                  channels_last=False, grad_accum_steps=1, clip_grad=5.0)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train_one_epoch(parts, batches, Position(), 1, env, lambda: False)
    (images,) = seen
    zeros = (images == 0).all(dim=1)  # (B, H, W): erased pixels, all channels zero
    assert all(zeros[i].any() for i in range(4))  # every image has its erased box, untouched by mixing
    assert (images[~zeros.unsqueeze(1).expand_as(images)] >= 1.0).all()  # the rest is mixed images (>= 1)
