"""The distributed environment, from the standard variables only: the trainer never knows who
launched it (launch/local.py, SLURM through submitit, Ray, or torchrun all set these)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

    A single process started by hand gets a one-process group on a free local port, so the same
    code path (and DeepSpeed, which insists on a process group) runs everywhere.
    """
    if not all(name in os.environ for name in REQUIRED):
        if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
            missing = [name for name in REQUIRED if name not in os.environ]
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: use a launcher (launch/local.py)")
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port())})
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    else:
        resolved = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend or ("nccl" if use_cuda else "gloo"), auto_mpi_discovery=False)
    return DistEnv(rank, world_size, local_rank, resolved)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_true(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks take the same branch)."""
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
