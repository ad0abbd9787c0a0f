"""Process-group set-up for one process per device: torchrun, SLURM (submitit / srun), or single process.

Rank and world size come from the launcher's environment:
- torchrun (single or multi-node) exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- a SLURM job with several tasks (hydra/launcher=slurm, or plain srun) exports SLURM_PROCID,
  SLURM_NTASKS, ...; submitit turns those into the torchrun variables;
- anything else is a single process (rank 0 of 1).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _export_slurm_env() -> None:
    """Inside a multi-task SLURM job without torchrun: set the env:// variables from SLURM's."""
    from submitit.helpers import TorchDistributedEnvironment

    # submitit reads SLURM's variables once told the job is a SLURM one: true under the submitit
    # launcher, and just as true under a plain `srun python train.py`.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    # CUDA_VISIBLE_DEVICES is left alone: each task picks cuda:LOCAL_RANK itself.
    # overwrite=True: a MASTER_PORT set by the job script is read first and exported unchanged.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` = this process's GPU when CUDA exists, else CPU; otherwise a torch device string."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} asks for CUDA but torch.cuda.is_available() is False; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device_name: str = "auto", timeout_min: float = 30) -> DistEnv:
    """Join the process group when launched with several processes; return this process's place."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        _export_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank (e.g. the run directory, so all ranks agree)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
