"""Evaluate a training checkpoint or a timm model with original/HF weights; configs/eval.yaml.

    python eval.py checkpoint=runs/dinat_nano_digits/<date>/checkpoints/best.pt
    python eval.py model=dinat_mini weights=/path/dinat_mini_in1k_224.pth data=imagenet data.root=/data/imagenet \
        throughput.enabled=true throughput.batch_size=256 amp=bf16

See docs/training.md. The logic lives in ``training/evaluator.py``.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig):
    from dinat.training import run_eval

    metrics = run_eval(cfg)
    line = (f"{metrics['count']} images | top-1 {metrics['top1']:.2f}% | top-5 {metrics['top5']:.2f}% | "
            f"loss {metrics['loss']:.4f}")
    if "img_per_s" in metrics:
        line += f" | {metrics['img_per_s']:.1f} img/s at batch {metrics['throughput_batch_size']}"
    print(line, flush=True)
    return metrics["top1"]


if __name__ == "__main__":
    main()
