"""Exponential moving average of the weights, for whatever part of them this rank holds.

Under ZeRO-3 each rank holds only its partition of every parameter (``param.ds_tensor``); the
EMA follows that partition, so it costs 4 bytes per locally held parameter and is saved per
rank beside the DeepSpeed shards. Under ZeRO 0-2 every rank holds the whole parameter.
DeepSpeed's ZeRO-3 layout: each parameter flattened, padded to ``world_size * ceil(numel /
world_size)`` elements, rank r holding the r-th chunk. :meth:`full_state_dict` all-gathers the
chunks (for the portable weights); :meth:`load_full_state_dict` cuts whole tensors back into
this rank's chunks (an elastic resume on a different number of ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.ranks import rank_and_world


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in module.named_parameters()]
        self._params = [param for _, param in module.named_parameters()]
        self.shadow = [self._local(p).detach().float().clone() for p in self._params]
        self.updates = 0  # since construction (not saved): tests check it advances once per optimizer step

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.data

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self._params):
            shadow.lerp_(self._local(param).float(), 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for i, name in enumerate(self.names):
            if state[name].shape != self.shadow[i].shape:
                raise ValueError(f"EMA state for {name} has shape {tuple(state[name].shape)}, expected {tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(state[name])

    @torch.no_grad()
    def full_state_dict(self, device: torch.device, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on the CPU. Under ZeRO-3 collective: every rank must call it
        (``keep=False``: take part, keep nothing)."""
        out = {}
        for name, shadow, param in zip(self.names, self.shadow, self._params):
            if not hasattr(param, "ds_tensor"):
                if keep:
                    out[name] = shadow.detach().cpu().clone()
                continue
            _, world = rank_and_world()
            local = shadow.to(device)
            parts = [torch.empty_like(local) for _ in range(world)]
            if world > 1:
                dist.all_gather(parts, local)
            else:
                parts = [local]
            if keep:
                out[name] = torch.cat(parts)[:param.ds_numel].reshape(param.ds_shape).cpu()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take whole tensors (any earlier world size or ZeRO stage) and keep this rank's part of each."""
        missing = [name for name in self.names if name not in state]
        if missing:
            raise ValueError(f"EMA weights lack {len(missing)} parameters, e.g. {missing[:3]}")
        rank, world = rank_and_world()
        for i, (name, param) in enumerate(zip(self.names, self._params)):
            full = state[name].float().flatten()
            if hasattr(param, "ds_tensor"):
                chunk = self.shadow[i].numel()
                padded = torch.zeros(chunk * world)
                padded[:full.numel()] = full
                self.shadow[i].copy_(padded[rank * chunk:(rank + 1) * chunk])
            else:
                self.shadow[i].copy_(full.reshape(self.shadow[i].shape))
