"""A per-object MLP whose weights are the representation: ζ is the flat vector of its weights.

Points are positionally encoded, then go through ``hidden_layers`` SiLU layers to features.
The origin cannot be all zeros: with zero weights every hidden activation is zero, and the
gradient would vanish for every layer but the last. It is a fixed random initialisation
(seeded, the same for every object), so GOEmbed sees a gradient in every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model_zoo.representations.base import Representation


class MLPRepresentation(Representation):
    kind = "mlp"

    def __init__(self, channels: int, hidden: int = 32, hidden_layers: int = 2, frequencies: int = 4, origin_seed: int = 0):
        super().__init__()
        self.channels, self.hidden, self.frequencies = channels, hidden, frequencies
        self.in_dim = 3 + 6 * frequencies
        dims = [self.in_dim] + [hidden] * hidden_layers + [channels]
        self.layer_dims = list(zip(dims[:-1], dims[1:]))
        generator = torch.Generator().manual_seed(origin_seed)
        parts = []
        for fan_in, fan_out in self.layer_dims:
            bound = math.sqrt(6.0 / fan_in)  # He-uniform for SiLU: activations neither die nor explode
            parts += [(torch.rand(fan_in * fan_out, generator=generator) * 2 - 1) * bound, torch.zeros(fan_out)]
        self.register_buffer("_origin", torch.cat(parts), persistent=False)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self._origin.numel(),)

    @property
    def feature_dim(self) -> int:
        return self.channels

    def origin(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return self._origin.to(device=device, dtype=dtype).expand(batch_size, -1).clone()

    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        scales = (2.0 ** torch.arange(self.frequencies, device=points.device, dtype=points.dtype)) * math.pi
        angles = points.unsqueeze(-1) * scales  # (B, N, 3, L)
        return torch.cat([points, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        x = self.encode_points(points.to(state.dtype))
        offset = 0
        for layer, (fan_in, fan_out) in enumerate(self.layer_dims):
            weight = state[:, offset:offset + fan_in * fan_out].reshape(-1, fan_in, fan_out)
            offset += fan_in * fan_out
            bias = state[:, offset:offset + fan_out].unsqueeze(1)
            offset += fan_out
            x = torch.baddbmm(bias, x, weight)
            if layer < len(self.layer_dims) - 1:
                x = F.silu(x)
        return x
