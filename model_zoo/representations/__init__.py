"""3D representations: a per-object state tensor ζ and a way to read features at 3D points.

Every representation answers the same small interface (see base.py), so the renderer, GOEmbed
and the denoisers work with any of them. Adding one (e.g. a hash grid) is one new file plus a
line in REPRESENTATIONS.
"""

from model_zoo.representations.base import Representation
from model_zoo.representations.mlp import MLPRepresentation
from model_zoo.representations.triplane import TriplaneRepresentation
from model_zoo.representations.voxel import VoxelRepresentation

REPRESENTATIONS = {
    "triplane": TriplaneRepresentation,
    "voxel": VoxelRepresentation,
    "mlp": MLPRepresentation,
}


def build_representation(kind: str, **kwargs) -> Representation:
    if kind not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {sorted(REPRESENTATIONS)}, got {kind!r}")
    return REPRESENTATIONS[kind](**kwargs)


__all__ = ["Representation", "TriplaneRepresentation", "VoxelRepresentation", "MLPRepresentation",
           "REPRESENTATIONS", "build_representation"]
