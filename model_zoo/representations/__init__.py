"""3D representations: a per-object state tensor ζ and a way to read features at 3D points.

Every representation answers the same small interface (see base.py), so the renderer, GOEmbed
and the denoisers work with any of them. Adding one (e.g. a hash grid) is one new file plus a
line in REPRESENTATIONS (the hash grid was added that way).
"""

from model_zoo.representations.base import ORIGINS, GridRepresentation, Representation
from model_zoo.representations.hashgrid import HashGridRepresentation
from model_zoo.representations.mlp import MLPRepresentation
from model_zoo.representations.triplane import TriplaneRepresentation
from model_zoo.representations.voxel import VoxelRepresentation

REPRESENTATIONS = {
    "triplane": TriplaneRepresentation,
    "voxel": VoxelRepresentation,
    "mlp": MLPRepresentation,
    "hashgrid": HashGridRepresentation,
}


def build_representation(kind: str, **kwargs) -> Representation:
    if kind not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {sorted(REPRESENTATIONS)}, got {kind!r}")
    return REPRESENTATIONS[kind](**kwargs)


__all__ = ["Representation", "GridRepresentation", "HashGridRepresentation", "ORIGINS", "TriplaneRepresentation", "VoxelRepresentation", "MLPRepresentation",
           "REPRESENTATIONS", "build_representation"]
