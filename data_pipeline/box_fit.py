"""Does an object fit the model's box? A check the reader runs on every object it loads.

The model renders only inside [-h, h]^3 (``model.box_half_size``). An object outside it is clipped
in training, one far smaller fills a few voxels, and a camera inside the box or looking away
from it sees nothing the model can explain — all without an error. Objects rendered by
``data_pipeline.render`` or normalised by ``data_pipeline.ingest`` carry their box in
``extra.object_bbox``; for every object the cameras are checked too.
"""

from __future__ import annotations

import logging

import numpy as np

from data_pipeline.schema import ObjectSample

log = logging.getLogger("data_pipeline.box_fit")
TOLERANCE = 0.02  # relative: an object may reach 2% past the box before it counts


def box_problems(sample: ObjectSample, box_half_size: float) -> list[str]:
    """Why the object or its cameras do not fit [-h, h]^3 (empty when they do)."""
    h = float(box_half_size)
    problems = []
    bbox = sample.extra.get("object_bbox")
    if bbox is not None:
        lo, hi = np.asarray(bbox, dtype=np.float64)
        reach = float(max(np.abs(lo).max(), np.abs(hi).max()))
        if reach > h * (1 + TOLERANCE):
            problems.append(f"its box reaches {reach:.3g}, outside the model's box [-{h:g}, {h:g}]^3")
        elif reach < 0.25 * h:
            problems.append(f"its box reaches only {reach:.3g}, a small part of the model's box [-{h:g}, {h:g}]^3")
    centres = sample.c2w[:, :3, 3]
    inside = np.nonzero(np.abs(centres).max(axis=1) < h)[0]
    if len(inside):
        problems.append(f"{len(inside)} camera(s) (first: view {inside[0]}) sit inside the model's box")
    # the box centre must be in front of every camera and project into its image
    w2c = np.linalg.inv(sample.c2w)
    origin_cam = w2c[:, :3, 3]
    z = origin_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.einsum("vij,vj->vi", sample.intrinsics, origin_cam)[:, :2] / z[:, None]
    away = np.nonzero((z <= 0) | (uv[:, 0] < 0) | (uv[:, 0] > sample.width) | (uv[:, 1] < 0) | (uv[:, 1] > sample.height))[0]
    if len(away):
        problems.append(f"{len(away)} camera(s) (first: view {away[0]}) do not see the box centre")
    return problems


class BoxFitWarner:
    """Logs the first object that does not fit, once per process, then counts quietly."""

    def __init__(self, box_half_size: float):
        self.box_half_size = box_half_size
        self.misfits = 0

    def __call__(self, sample: ObjectSample) -> None:
        problems = box_problems(sample, self.box_half_size)
        if not problems:
            return
        self.misfits += 1
        if self.misfits == 1:
            log.warning("object %s does not fit the model's box (model.box_half_size=%g): %s. Training clips or "
                        "shrinks such objects; render with data_pipeline.render or ingest with --normalize "
                        "visual-hull to fit them (warned once per reader process)", sample.object_id,
                        self.box_half_size, "; ".join(problems))
