"""Exponential moving average of the weights, for whatever part of them this rank holds.

Under ZeRO-3 each rank holds only its partition of every parameter (``param.ds_tensor``); the
EMA follows that partition, so it costs 4 bytes per locally held parameter and is saved per
rank beside the DeepSpeed shards. Under ZeRO 0-2 every rank holds the whole parameter.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in module.named_parameters()]
        self._params = [param for _, param in module.named_parameters()]
        self.shadow = [self._local(p).detach().float().clone() for p in self._params]

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.data

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self._params):
            shadow.lerp_(self._local(param).float(), 1.0 - self.decay)

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
