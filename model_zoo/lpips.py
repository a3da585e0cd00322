"""LPIPS (learned perceptual image patch similarity) with weights from a configured file.

Nothing is downloaded: the weights come from ``weights_path``, a safetensors or ``torch.save``
file (loaded with ``weights_only=True``) holding an AlexNet feature extractor and LPIPS's five
linear heads under these keys (torchvision's AlexNet names, and the LPIPS release's heads)::

    features.{0,3,6,8,10}.{weight,bias}     AlexNet conv layers
    lin{0..4}.model.1.weight                 1x1 conv heads, shape (1, C_l, 1, 1)

Distance (Zhang et al. 2018): per layer, unit-normalise features over channels, square the
difference, weight channels with the head, average over space; sum over layers. Images in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS's input scaling: images in [-1, 1], then this shift and scale per channel.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class AlexNetFeatures(nn.Module):
    """torchvision's AlexNet ``features`` layout, returning the five ReLU outputs LPIPS uses."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict({
            "0": nn.Conv2d(3, 64, 11, stride=4, padding=2),
            "3": nn.Conv2d(64, 192, 5, padding=2),
            "6": nn.Conv2d(192, 384, 3, padding=1),
            "8": nn.Conv2d(384, 256, 3, padding=1),
            "10": nn.Conv2d(256, 256, 3, padding=1),
        })

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for name in ("0", "3", "6", "8", "10"):
            if name in ("3", "6"):
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(self.features[name](x))
            outputs.append(x)
        return outputs


class LPIPS(nn.Module):
    def __init__(self, weights_path: str | None = None):
        super().__init__()
        self.net = AlexNetFeatures()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        if weights_path is not None:
            self.load_weights(weights_path)
        self.requires_grad_(False).eval()

    def load_weights(self, path: str) -> None:
        state = load_state_file(path)
        mapped = {}
        for key, value in state.items():
            if key.startswith("features."):
                mapped["net." + key] = value
            elif key.startswith("lin") and key.endswith(".model.1.weight"):
                mapped[f"heads.{int(key[3])}.weight"] = value
        missing = set(self.state_dict()) - set(mapped)
        if missing:
            raise ValueError(f"LPIPS weights at {path} lack {sorted(missing)[:4]}... (see model_zoo/lpips.py for the expected keys)")
        self.load_state_dict(mapped, strict=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances (N,) between images (N, 3, H, W) in [0, 1]; H, W >= 32."""
        fa = self.net(((a * 2 - 1) - self.shift) / self.scale)
        fb = self.net(((b * 2 - 1) - self.shift) / self.scale)
        total = 0.0
        for x, y, head in zip(fa, fb, self.heads):
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + head((x - y) ** 2).mean(dim=(1, 2, 3))
        return total


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """A tensor dict from safetensors or a ``torch.save`` file, never unpickling arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
