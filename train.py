"""Train an image classifier (the DiNAT family by default); configuration in configs/train.yaml.

    python train.py                                   # the demo: dinat_nano on the digits, CPU, minutes
    python train.py experiment=dinat_mini_in1k data.root=/data/imagenet
    torchrun --nproc_per_node=8 train.py experiment=dinat_mini_in1k data.root=/data/imagenet
    python train.py -m hydra/launcher=slurm experiment=dinat_mini_in1k data.root=/data/imagenet

See docs/training.md. The logic lives in the ``training`` package.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def eval_command(checkpoint: str, use_ema: bool = False) -> str:
    """The eval.py command that evaluates ``checkpoint`` (its EMA weights if ``use_ema``) on this run's data."""
    hydra_cfg = HydraConfig.get()
    data_overrides = [o for o in hydra_cfg.overrides.task if o.startswith(("data.", "+data."))]
    return " ".join(["python eval.py", f"checkpoint={checkpoint}", *(["use_ema=true"] if use_ema else []),
                     f"data={hydra_cfg.runtime.choices['data']}", *data_overrides])


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    from dinat.training import PreemptionHandler, train

    handler = PreemptionHandler(list(cfg.preempt_signals)).install()
    summary = train(cfg, preemption=handler)
    if summary["preempted"]:
        print(f"stopped by {summary['preempted']}; checkpoint: {summary['checkpoint']} "
              f"(run again with hydra.run.dir={summary['run_dir']} to resume)", flush=True)
        handler.exit()  # hands the signal to submitit (requeue) if it is there, then exits
    handler.uninstall()
    if summary.get("best") is None or "val/top1" not in summary["metrics"]:
        return None
    metrics, best = summary["metrics"], summary["best"]
    ema_best = best.get("weights") == "ema"  # with EMA on, best.pt is the epoch of the best EMA top-1
    print(f"done: {summary['epochs']} epochs | final val top-1 {metrics['val/top1']:.2f}% "
          f"top-5 {metrics['val/top5']:.2f}% | best{' EMA' if ema_best else ''} top-1 {best['top1']:.2f}% "
          f"(epoch {best['epoch']})\n"
          f"checkpoints: {summary['checkpoint']} (last), {summary['best_checkpoint']} (best)\n"
          f"evaluate:    {eval_command(summary['best_checkpoint'], use_ema=ema_best)}", flush=True)
    return best["top1"]  # for Hydra sweepers


if __name__ == "__main__":
    sys.exit(main())
