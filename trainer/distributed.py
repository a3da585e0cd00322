"""The distributed environment, from the standard variables only: the trainer never knows who
launched it (launch/local.py, SLURM through submitit, Ray, or torchrun all set these).

Every collective the trainer issues itself goes through the helpers below, and each one is safe
on NCCL: tensor collectives use tensors on the process's device (NCCL refuses CPU tensors), and
pickled objects and barriers go through a separate gloo group (``object_group()``) so that they
never need a CUDA tensor or a guess of which GPU a rank owns. On CPU the object group is a second
gloo group as well, so a CPU test exercises the same calls (tests/test_trainer_collectives.py
wraps torch.distributed and checks both rules on a real 2-rank run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_object_group = None  # the gloo group for objects and barriers (None: a single process)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device of a rank for ``train.device`` (auto: the rank's GPU if CUDA is available)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():  # trainer.config.check_runnable says so earlier
        raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

    A single process started by hand gets a one-process group on a free local port, so the same
    code path (and DeepSpeed, which insists on a process group) runs everywhere.
    """
    global _object_group
    if not all(name in os.environ for name in REQUIRED):
        if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
            missing = [name for name in REQUIRED if name not in os.environ]
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: use a launcher (launch/local.py)")
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port())})
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend or ("nccl" if resolved.type == "cuda" else "gloo"),
                                   auto_mpi_discovery=False)
    if _object_group is None and dist.get_world_size() > 1:
        _object_group = dist.new_group(backend="gloo")  # every rank, same order: right after init
    return DistEnv(rank, world_size, local_rank, resolved)


def object_group():
    """The gloo group that carries pickled objects and barriers (None when there is one process)."""
    return _object_group


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _multi_process() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_true(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks take the same branch).

    ``flag`` may be a bool tensor on ``device`` (no host sync before the collective). One
    all-reduce on the process's device and one host sync.
    """
    value = torch.as_tensor(flag, device=device).to(device=device, dtype=torch.float32).reshape(1)
    if _multi_process():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def barrier() -> None:
    if _multi_process():
        dist.barrier(group=_object_group)


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (pickled, over the gloo object group)."""
    if not _multi_process():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled, over the gloo object group)."""
    if not _multi_process():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_object_group)
    return holder[0]
