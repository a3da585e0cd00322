"""This process's place in the torch.distributed job, for code that also runs without one."""

from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) when there is none (one process
    does all the work)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


__all__ = ["rank_and_world"]
