"""Analytic ray casting of textured primitives, vectorised over rays with numpy.

Used by :mod:`data_pipeline.synthetic` to render procedural objects exactly (no meshes, no
rasteriser). Three convex shapes, each in its own local frame (``x_world = center + rotation @
x_local``):

* :class:`Ellipsoid` with semi-axes ``radii``;
* :class:`Box` with half-sides ``half_size``;
* :class:`Cylinder` along local z with ``radius`` and half-height ``half_height``, capped.

Every intersection routine returns the smallest ``t > EPS`` at which ``origin + t * direction``
meets the surface (``inf`` on a miss). Directions need not be unit length: the renderer passes
camera rays scaled so that their camera-space z is 1, which makes ``t`` the camera depth.

A :class:`Part` is a shape plus a :class:`Texture` defined in the shape's local coordinates, so
the pattern sticks to the surface whichever way the object is seen. Shading is Lambertian under
fixed world-space lights, so a surface point has the same colour in every view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from data_pipeline.cameras import project_points

EPS = 1e-9  # minimum ray parameter: rays start at the camera, far outside every shape

# Fixed world-space lighting (world z is up). A key light from above plus a weaker fill from the
# opposite direction keeps the unlit side from being a flat ambient colour. The maximum of
# AMBIENT + KEY * max(0, n.L) + FILL * max(0, -n.L) is AMBIENT + KEY = 1, so albedo <= 0.9 can
# never reach a pure white background.
LIGHT_DIR = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])
AMBIENT, KEY, FILL = 0.45, 0.55, 0.2

TEXTURE_KINDS = ("checker", "stripes", "rings")
# Rays traced per numpy batch (whole views at a time). ~0.8 MB per (N, 3) float64 array: small
# enough to stay in cache and to be reused by malloc instead of mmap/munmap churn, which
# measured ~20% faster than one batch per object at 128 px.
RAY_BATCH = 1 << 15


def rows_times(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``rows @ matrix`` for an (N, 3) array and a 3x3 matrix.

    einsum's own loop is several times faster than BLAS for an inner size of 3, and its result
    cannot depend on BLAS threading, which keeps renders identical in every worker process.
    """
    return np.einsum("ni,ij->nj", rows, matrix)


@dataclass(frozen=True)
class Texture:
    """A two-colour procedural pattern evaluated at local (shape-frame) coordinates.

    ``period`` is the length of one full a/b cycle in world units; ``axis`` selects the stripe
    direction (stripes) or the ring axis (rings); ``phase`` (in cycles) shifts the pattern so its
    edges do not line up with the shape's faces.
    """

    kind: str
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    period: float
    axis: int = 2
    phase: float = 0.0

    def albedo(self, p_local: np.ndarray) -> np.ndarray:
        q = p_local * (2.0 / self.period) + self.phase  # one unit of q = half a period = one band
        if self.kind == "checker":
            band = np.floor(q).astype(np.int64).sum(axis=1)
        elif self.kind == "stripes":
            band = np.floor(q[:, self.axis]).astype(np.int64)
        elif self.kind == "rings":
            others = [a for a in range(3) if a != self.axis]
            r = np.sqrt((p_local[:, others] ** 2).sum(axis=1)) * (2.0 / self.period) + self.phase
            band = np.floor(r).astype(np.int64)
        else:
            raise ValueError(f"unknown texture kind {self.kind!r}; expected one of {TEXTURE_KINDS}")
        use_b = (band % 2 == 1)[:, None]
        return np.where(use_b, np.asarray(self.color_b), np.asarray(self.color_a))

    def to_json(self) -> dict:
        return {"kind": self.kind, "color_a": list(self.color_a), "color_b": list(self.color_b),
                "period": self.period, "axis": self.axis, "phase": self.phase}


@dataclass(frozen=True, eq=False)
class Shape:
    """Common part of the three shapes: a rigid local frame. Subclasses add their size."""

    center: np.ndarray  # (3,) world position of the local origin
    rotation: np.ndarray  # (3, 3) local -> world, columns are the local axes

    kind = "shape"

    def to_local(self, points: np.ndarray) -> np.ndarray:
        # R^T (p - c), written for row vectors.
        return rows_times(points - self.center, self.rotation)

    def local_rays(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.to_local(origins), rows_times(dirs, self.rotation)

    def normal_to_world(self, n_local: np.ndarray) -> np.ndarray:
        n = rows_times(n_local, self.rotation.T)
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    def transformed(self, scale: float, shift: np.ndarray) -> "Shape":
        """The shape after ``x -> (x + shift) * scale`` (used to fit an object into its box)."""
        return replace(self, center=(self.center + shift) * scale, **self._scaled_size(scale))

    def _size(self) -> dict:
        """The fields a subclass adds (its size: lengths, scaled with the shape)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("center", "rotation")}

    def _scaled_size(self, scale: float) -> dict:
        return {name: value * scale for name, value in self._size().items()}

    def to_json(self) -> dict:
        return {"kind": self.kind, "center": self.center.tolist(), "rotation": self.rotation.tolist(),
                **{name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in self._size().items()}}

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Nearest t > EPS where each ray meets the surface, inf on a miss."""
        # Rays parallel to a box's slab or a cylinder's cap give t = +-huge or inf - inf: expected
        # (those candidates lose to real hits or count as misses), so numpy need not warn.
        with np.errstate(over="ignore", invalid="ignore"):
            return self._intersect_local(*self.local_rays(origins, dirs))

    # Implemented by each shape.
    def _intersect_local(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        """:meth:`intersect` for rays (origins ``o``, directions ``d``) in the shape's local frame."""
        raise NotImplementedError

    def normal(self, points: np.ndarray) -> np.ndarray:
        """Outward unit normals (N, 3) at surface points."""
        raise NotImplementedError

    def half_extent(self) -> np.ndarray:
        """Half-sides (3,) of the exact world AABB, which is centred on ``center``."""
        raise NotImplementedError


def _nearest_positive(*candidates: np.ndarray) -> np.ndarray:
    """Element-wise smallest candidate t > EPS (inf where none); NaN counts as a miss."""
    best = np.full(np.shape(candidates[0]), np.inf)
    for t in candidates:
        valid = t > EPS  # False for NaN
        best = np.where(valid & (t < best), t, best)
    return best


@dataclass(frozen=True, eq=False)
class Ellipsoid(Shape):
    radii: np.ndarray  # (3,) semi-axes along the local axes

    kind = "ellipsoid"

    def _intersect_local(self, o, d):
        o, d = o / self.radii, d / self.radii  # the ellipsoid becomes the unit sphere
        a = (d * d).sum(axis=1)
        b = (o * d).sum(axis=1)
        c = (o * o).sum(axis=1) - 1.0
        disc = b * b - a * c
        hit = disc >= 0.0
        root = np.sqrt(np.where(hit, disc, 0.0))
        near = np.where(hit, (-b - root) / a, np.inf)
        far = np.where(hit, (-b + root) / a, np.inf)
        return _nearest_positive(near, far)

    def normal(self, points):
        # Gradient of |p / r|^2 is 2 p / r^2.
        return self.normal_to_world(self.to_local(points) / self.radii**2)

    def half_extent(self):
        # Support function of an ellipsoid along world axis i: |diag(r) R^T e_i|.
        return np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1))


@dataclass(frozen=True, eq=False)
class Box(Shape):
    half_size: np.ndarray  # (3,) half-sides along the local axes

    kind = "box"

    def _intersect_local(self, o, d):
        # Slab method. Replace exact zeros so the division gives +-huge instead of NaN (0/0).
        d = np.where(np.abs(d) < 1e-300, 1e-300, d)
        t1 = (-self.half_size - o) / d
        t2 = (self.half_size - o) / d
        t_enter = np.minimum(t1, t2).max(axis=1)
        t_exit = np.maximum(t1, t2).min(axis=1)
        hit = t_enter <= t_exit
        return _nearest_positive(np.where(hit, t_enter, np.inf), np.where(hit, t_exit, np.inf))

    def normal(self, points):
        q = self.to_local(points) / self.half_size
        axis = np.abs(q).argmax(axis=1)  # the face whose slab the point is on
        n = np.zeros_like(q)
        rows = np.arange(len(q))
        n[rows, axis] = np.sign(q[rows, axis])
        return self.normal_to_world(n)

    def half_extent(self):
        return (np.abs(self.rotation) * self.half_size).sum(axis=1)



@dataclass(frozen=True, eq=False)
class Cylinder(Shape):
    radius: float
    half_height: float  # along local z

    kind = "cylinder"

    def _intersect_local(self, o, d):
        r, h = self.radius, self.half_height
        # Side: x^2 + y^2 = r^2 with |z| <= h. Rays parallel to the axis (a == 0) miss the side.
        a = d[:, 0] ** 2 + d[:, 1] ** 2
        b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - r * r
        disc = b * b - a * c
        hit = (disc >= 0.0) & (a > 0.0)
        root = np.sqrt(np.where(hit, disc, 0.0))
        safe_a = np.where(hit, a, 1.0)
        candidates = []
        for sign in (-1.0, 1.0):
            t = np.where(hit, (-b + sign * root) / safe_a, np.inf)
            z = o[:, 2] + t * d[:, 2]
            candidates.append(np.where(np.abs(z) <= h, t, np.inf))
        # Caps: z = +-h with x^2 + y^2 <= r^2.
        dz = np.where(d[:, 2] == 0.0, 1e-300, d[:, 2])
        for cap in (-h, h):
            t = (cap - o[:, 2]) / dz
            x, y = o[:, 0] + t * d[:, 0], o[:, 1] + t * d[:, 1]
            candidates.append(np.where(x * x + y * y <= r * r, t, np.inf))
        return _nearest_positive(*candidates)

    def normal(self, points):
        p = self.to_local(points)
        radial = np.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2)
        on_cap = np.abs(p[:, 2]) / self.half_height >= radial / self.radius
        side = np.stack([p[:, 0], p[:, 1], np.zeros(len(p))], axis=1) / np.maximum(radial, 1e-300)[:, None]
        cap = np.stack([np.zeros(len(p)), np.zeros(len(p)), np.sign(p[:, 2])], axis=1)
        return self.normal_to_world(np.where(on_cap[:, None], cap, side))

    def half_extent(self):
        axis = self.rotation[:, 2]
        # The two cap discs bound the cylinder; a disc of radius r with normal a spans
        # r * sqrt(1 - a_i^2) along world axis i.
        return np.abs(axis) * self.half_height + self.radius * np.sqrt(np.clip(1.0 - axis**2, 0.0, None))



@dataclass(frozen=True, eq=False)
class Part:
    """One textured primitive of an object."""

    shape: Shape
    texture: Texture

    def albedo(self, points: np.ndarray) -> np.ndarray:
        return self.texture.albedo(self.shape.to_local(points))

    def to_json(self) -> dict:
        return {**self.shape.to_json(), "texture": self.texture.to_json()}


def bounds(shapes: list[Shape]) -> tuple[np.ndarray, np.ndarray]:
    """Exact world AABB (lo, hi) of a union of shapes."""
    lo = np.min([s.center - s.half_extent() for s in shapes], axis=0)
    hi = np.max([s.center + s.half_extent() for s in shapes], axis=0)
    return lo, hi


def cast_rays(parts: list[Part], origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit over all parts: (t (N,), part index (N,), -1 and inf where nothing is hit)."""
    t_best = np.full(len(origins), np.inf)
    which = np.full(len(origins), -1, dtype=np.int64)
    for k, part in enumerate(parts):
        t = part.shape.intersect(origins, dirs)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        which = np.where(closer, k, which)
    return t_best, which


def shade(parts: list[Part], points: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Lambertian colour (N, 3) in [0, 1] of hit points on the parts given by ``which`` (>= 0)."""
    rgb = np.zeros((len(points), 3))
    for k, part in enumerate(parts):
        sel = which == k
        if not sel.any():
            continue
        p = points[sel]
        cos = np.einsum("ni,i->n", part.shape.normal(p), LIGHT_DIR)
        light = AMBIENT + KEY * np.maximum(cos, 0.0) + FILL * np.maximum(-cos, 0.0)
        rgb[sel] = part.albedo(p) * light[:, None]
    return rgb


def camera_rays(K: np.ndarray, c2w: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World rays (origins, dirs), (N, 3) each, through continuous pixel coordinates ``uv`` (N, 2).

    Directions have camera-space z = 1 (not unit length), so a hit's ``t`` is its camera depth,
    the same depth :func:`cameras.project_points` returns.
    """
    pix = np.concatenate([uv, np.ones((len(uv), 1))], axis=1)
    dirs = rows_times(pix, (c2w[:3, :3] @ np.linalg.inv(K)).T)
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape)
    return origins, dirs


def pixel_window(K: np.ndarray, c2w: np.ndarray, width: int, height: int, lo: np.ndarray, hi: np.ndarray
                 ) -> tuple[int, int, int, int]:
    """Rows [i0, i1) and columns [j0, j1) whose pixel centres may see the box [lo, hi].

    A box projects inside the 2D bounding rectangle of its projected corners (when all corners
    are in front of the camera), so pixels outside it cannot hit the object: skipping them
    saves most of the work, as objects cover a minority of each image.
    """
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    uv, depth = project_points(corners, K, c2w)
    if (depth <= 0.0).any():  # the camera is beside or inside the box: no safe rectangle
        return 0, height, 0, width
    # Pixel j's centre is j + 0.5: it lies in [u_min, u_max] for ceil(u_min - 0.5) <= j <= floor(u_max - 0.5).
    j0 = max(0, math.ceil(uv[:, 0].min() - 0.5))
    j1 = min(width, math.floor(uv[:, 0].max() - 0.5) + 1)
    i0 = max(0, math.ceil(uv[:, 1].min() - 0.5))
    i1 = min(height, math.floor(uv[:, 1].max() - 0.5) + 1)
    return i0, max(i0, i1), j0, max(j0, j1)


def pixel_rays(K: np.ndarray, c2w: np.ndarray, width: int, height: int,
               window: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the centres (j + 0.5, i + 0.5) of the pixels of ``window`` (default: all),
    row-major, following the pixel convention of cameras.py."""
    i0, i1, j0, j1 = window if window is not None else (0, height, 0, width)
    u, v = np.meshgrid(np.arange(j0, j1) + 0.5, np.arange(i0, i1) + 0.5)
    return camera_rays(K, c2w, np.stack([u.ravel(), v.ravel()], axis=1))


def _trace(parts: list[Part], origins: np.ndarray, dirs: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Colours (N, 3) of rays: the shaded nearest hit, or the background on a miss."""
    t, which = cast_rays(parts, origins, dirs)
    hit = which >= 0
    rgb = np.empty_like(dirs)
    rgb[...] = background
    rgb[hit] = shade(parts, origins[hit] + t[hit, None] * dirs[hit], which[hit])
    return rgb


def render(parts: list[Part], intrinsics: np.ndarray, c2ws: np.ndarray, width: int, height: int,
           background: tuple[float, float, float]) -> np.ndarray:
    """Render every view: (V, H, W, 3) uint8, composited on ``background``.

    Only pixels inside each view's :func:`pixel_window` are traced. Several views are traced
    together (fewer, larger numpy calls), in batches of about RAY_BATCH rays to bound memory.
    """
    background = np.asarray(background, dtype=np.float64)
    images = np.empty((len(c2ws), height, width, 3))
    images[...] = background
    lo, hi = bounds([p.shape for p in parts])
    windows = [pixel_window(K, c2w, width, height, lo, hi) for K, c2w in zip(intrinsics, c2ws)]

    def flush(views: list[int]) -> None:
        rays = [pixel_rays(intrinsics[v], c2ws[v], width, height, windows[v]) for v in views]
        rgb = _trace(parts, np.concatenate([o for o, _ in rays]), np.concatenate([d for _, d in rays]), background)
        start = 0
        for v in views:
            i0, i1, j0, j1 = windows[v]
            count = (i1 - i0) * (j1 - j0)
            images[v, i0:i1, j0:j1] = rgb[start:start + count].reshape(i1 - i0, j1 - j0, 3)
            start += count

    batch, batch_rays = [], 0
    for v, (i0, i1, j0, j1) in enumerate(windows):
        count = (i1 - i0) * (j1 - j0)
        if batch and batch_rays + count > RAY_BATCH:
            flush(batch)
            batch, batch_rays = [], 0
        batch.append(v)
        batch_rays += count
    if batch:
        flush(batch)
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
