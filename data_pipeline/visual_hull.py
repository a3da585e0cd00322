"""The box of an object seen in posed views, from their masks alone (a coarse visual hull).

A point of space belongs to the hull when every view that sees it (it projects inside the
image, in front of the camera) sees the object there (mask >= 0.5). Points seen by fewer than
half of the views are left out: near the cameras and outside most images nothing is known. The
hull is carved twice: once on a grid over the sphere the cameras span, then on a finer grid
over the first box (grown by one coarse cell). The result is the hull's axis-aligned box, a
slight over-estimate of the object's (a hull contains the object), about one fine cell coarse.
"""

from __future__ import annotations

import numpy as np


class HullError(ValueError):
    """The masks agree on no point of space (inconsistent masks or cameras)."""


def _look_at_point(c2w: np.ndarray) -> np.ndarray:
    """The point closest (least squares) to every camera's optical axis: what the cameras look at."""
    origins, dirs = c2w[:, :3, 3], c2w[:, :3, 2]  # OpenCV: +z forward
    A, b = np.zeros((3, 3)), np.zeros(3)
    for o, d in zip(origins, dirs):
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ o
    return np.linalg.lstsq(A, b, rcond=None)[0]


def _carve(points: np.ndarray, masks: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    views, height, width = masks.shape
    seen = np.zeros(len(points), np.int32)
    inside = np.zeros(len(points), np.int32)
    for v in range(views):
        w2c = np.linalg.inv(c2w[v])
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2]
        front = z > 1e-9
        uvw = cam @ K[v].T
        u = np.where(front, uvw[:, 0] / np.where(front, z, 1.0), -1.0)
        w = np.where(front, uvw[:, 1] / np.where(front, z, 1.0), -1.0)
        ok = front & (u >= 0) & (u < width) & (w >= 0) & (w < height)
        seen += ok
        cols, rows = np.floor(u[ok]).astype(int), np.floor(w[ok]).astype(int)
        hit = np.zeros(len(points), bool)
        hit[np.nonzero(ok)[0]] = masks[v, rows, cols]
        inside += hit
    return (seen == inside) & (seen >= max(1, (views + 1) // 2))


def _grid(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    axes = [np.linspace(lo[i], hi[i], n) for i in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return points, (hi - lo) / (n - 1)


def visual_hull_box(masks: np.ndarray, K: np.ndarray, c2w: np.ndarray, grid: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) corners of the visual hull of boolean ``masks`` (V, H, W) with OpenCV cameras."""
    masks = np.asarray(masks, bool)
    centre = _look_at_point(c2w)
    radius = float(np.max(np.linalg.norm(c2w[:, :3, 3] - centre, axis=1)))
    lo, hi = centre - radius, centre + radius
    for _ in range(2):
        points, cell = _grid(lo, hi, grid)
        occupied = points[_carve(points, masks, K, c2w)]
        if len(occupied) == 0:
            raise HullError(f"the masks of {len(masks)} views agree on no point of space (grid {grid}^3)")
        lo, hi = occupied.min(0) - cell, occupied.max(0) + cell
    return occupied.min(0) - cell / 2, occupied.max(0) + cell / 2
