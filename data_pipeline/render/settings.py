"""The settings of one render job (typed; saved in the manifest so a resumed run can check them)."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

ENGINES = ("workbench", "cycles")
LIGHTING = ("sun", "uniform")
CAMERA_MODES = ("random", "orbit")


@dataclass(frozen=True)
class RenderSettings:
    views: int = 32
    resolution: int = 256
    engine: str = "cycles"
    samples: int = 32  # Cycles samples per pixel
    camera_mode: str = "random"  # random: uniform azimuth, elevation, distance; orbit: even azimuths
    # in box half-sizes; None = per object, where its bounding sphere fills FRAMING of the view
    camera_distance: tuple[float, float] | None = None
    elevation_deg: tuple[float, float] = (-10.0, 40.0)
    fov_deg: float = 50.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    lighting: str = "sun"  # sun: a sun lamp + soft ambient light; uniform: ambient light only (flat)
    seed: int = 0
    box: float = 1.0  # the training box is [-box, box]^3 (the model's box_half_size)
    fit: float = 0.9  # the object's largest half-extent after normalisation, as a fraction of box
    max_faces: int = 5_000_000  # larger meshes are skipped as "huge"

    def __post_init__(self):
        checks = {
            "views": self.views >= 1, "resolution": self.resolution >= 8, "engine": self.engine in ENGINES,
            "samples": self.samples >= 1, "camera_mode": self.camera_mode in CAMERA_MODES,
            "camera_distance": self.camera_distance is None or 0 < self.camera_distance[0] <= self.camera_distance[1],
            "elevation_deg": -90 <= self.elevation_deg[0] <= self.elevation_deg[1] <= 90,
            "fov_deg": 0 < self.fov_deg < 180, "lighting": self.lighting in LIGHTING,
            "box": self.box > 0, "fit": 0 < self.fit <= 1, "max_faces": self.max_faces >= 1,
            "background": len(self.background) == 3 and all(0 <= c <= 1 for c in self.background),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"RenderSettings.{name} is invalid: {getattr(self, name)!r}")
        # the object (largest half-extent fit*box, so radius <= sqrt(3) fit box) must stay in front of the camera
        if self.camera_distance is not None and self.camera_distance[0] <= math.sqrt(3) * self.fit:
            raise ValueError(f"--camera-distance {self.camera_distance[0]} box half-sizes puts the camera inside the "
                             f"object's bounding sphere (radius {math.sqrt(3) * self.fit:.3g}); use a larger minimum")

    def to_json(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


# With --camera-distance auto (the default) each object's cameras sit where the bounding sphere
# of its normalised box (radius r, centred at the origin) spans FRAMING of the half field of
# view: the whole box stays in every view from every direction, and the object fills the frame
# (the rig of data_pipeline.synthetic).
FRAMING = 0.9


def auto_distance(settings: RenderSettings, bounding_radius: float) -> float:
    return bounding_radius / math.sin(FRAMING * math.radians(settings.fov_deg) / 2.0)


def camera_positions(settings: RenderSettings, object_id: str, bounding_radius: float | None = None) -> tuple[np.ndarray, dict]:
    """(V, 3) camera centres (world, +Z up, looking at the origin) from the seed and the object id.

    The same (seed, object id) always gives the same cameras, whatever worker renders it.
    ``bounding_radius`` (of the normalised object's box) is needed with the automatic distance.
    Returns the positions and the sampled spherical coordinates (recorded in the metadata).
    """
    rng = np.random.default_rng([settings.seed, zlib.crc32(object_id.encode("utf-8"))])
    v = settings.views
    e_lo, e_hi = settings.elevation_deg
    if settings.camera_mode == "orbit":
        azimuth = (np.arange(v) * 360.0 / v + rng.uniform(0.0, 360.0)) % 360.0
        elevation = np.full(v, (e_lo + e_hi) / 2.0)
    else:
        azimuth = rng.uniform(0.0, 360.0, v)
        # uniform on the sphere's band between the two elevations (not uniform in the angle)
        s_lo, s_hi = np.sin(np.radians(e_lo)), np.sin(np.radians(e_hi))
        elevation = np.degrees(np.arcsin(rng.uniform(s_lo, s_hi, v)))
    if settings.camera_distance is None:
        if bounding_radius is None:
            raise ValueError("the automatic camera distance needs the object's bounding radius")
        r = np.full(v, auto_distance(settings, bounding_radius))
    elif settings.camera_mode == "orbit":
        r = np.full(v, sum(settings.camera_distance) / 2.0 * settings.box)
    else:
        r = rng.uniform(*settings.camera_distance, v) * settings.box
    az, el = np.radians(azimuth), np.radians(elevation)
    positions = np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el)], axis=1)
    return positions, {"azimuth_deg": azimuth.tolist(), "elevation_deg": elevation.tolist(), "distance": r.tolist()}
