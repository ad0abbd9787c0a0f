"""Training and evaluation logic behind train.py and eval.py (Hydra configs in configs/).

- data:        datasets/transforms/loaders from timm; the digits demo set
- model:       timm.create_model with the project's models registered
- optim:       optimizer parameter groups (decay_rpb) and schedules (timm's, plus constant)
- loop:        one training epoch, one evaluation pass
- trainer:     the whole training run (resume, checkpoints, preemption, logging)
- evaluator:   eval.py's accuracy and throughput measurement
- checkpoint:  atomic saves, weights_only loads, RNG capture
- distributed: torchrun / SLURM process groups
- preemption:  signal -> checkpoint -> exit (and submitit requeue)
- tracking:    wandb or nothing
"""

if __name__ == "training":  # this folder imported by its bare name: see dinat/_bare_names.py
    from dinat._bare_names import hand_over
    hand_over(globals())

from .evaluator import run_eval
from .preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from .trainer import train

__all__ = ["train", "run_eval", "PreemptionHandler", "PREEMPTED_EXIT_CODE"]
