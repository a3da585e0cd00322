"""Procedural multi-view data: textured primitive compositions, ray cast exactly, written as shards.

    python -m data_pipeline.synthetic --out DIR_OR_URL --objects 300 --views 24 --resolution 64 --seed 0

Each object is a composition of 2-6 coloured, textured primitives (ellipsoids, rotated boxes,
capped cylinders) from one of a few families ("random", "snowman", "table", "tower",
"mushroom"), centred and scaled so its exact bounding box fits inside [-1, 1]^3 (its largest
half-side is :data:`OBJECT_FILL`). It is rendered by analytic ray casting (primitives.py) from
V cameras on a sphere around the origin, all looking at the origin with the same field of view.

Determinism: object ``i`` is generated from ``numpy.random.default_rng([seed, i])`` alone, so the
objects can be made in any order, in any number of worker processes, and the shards come out
byte-identical. Geometry and textures are drawn before the cameras, so the same (seed, i) gives
the same object whatever the number of views or the resolution.

The hold-out split is by object: the ``round(fraction * N)`` objects with the smallest hash of
(seed, i) go to ``holdout-*.tar``, the rest to ``train-*.tar``. Hash ranks barely move when N
grows, so a larger dataset mostly keeps the split of a smaller one.
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import hashlib
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from tqdm import tqdm

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w
from data_pipeline.cli_types import background_colour, usage_errors
from data_pipeline.primitives import (
    LIGHT_DIR,
    TEXTURE_KINDS,
    Box,
    Cylinder,
    Ellipsoid,
    Part,
    Shape,
    Texture,
    bounds,
    render,
)
from data_pipeline.schema import IMAGE_FORMATS, ObjectSample, encode_image
from data_pipeline.shards import ShardWriter

GENERATOR = "data_pipeline.synthetic"
GENERATOR_VERSION = 2  # bump when the same (seed, index) would produce a different object
SOURCE = "synthetic"
FAMILIES = ("random", "snowman", "table", "tower", "mushroom")
BBOX = [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]  # every object lies inside this cube
OBJECT_FILL = 0.9  # the object's largest half-side; the margin keeps it off the cube's faces
MIN_RESOLUTION = 8

# Camera rig. Each object's cameras are as close as they can be while its whole bounding box
# stays in every view from every direction: the box's bounding sphere (radius r) seen from
# distance d spans a half-angle asin(r / d); the cameras sit where that is 90% of the half field
# of view, so the object fills the frame (and the box's corners stay >= 5% of the width from the
# border) whatever its shape. The distance is stored per object in extra.camera_radius.
FOV_DEG = 50.0
FRAMING = 0.9


def camera_radius(bounding_radius: float) -> float:
    return bounding_radius / math.sin(FRAMING * math.radians(FOV_DEG) / 2.0)


WORLD_UP = np.array([0.0, 0.0, 1.0])  # objects are built upright along +z; images keep +z up


class ConfigError(ValueError):
    """Invalid generation parameters; the message names the command-line flag."""


# --------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SyntheticObject:
    """The geometry and appearance of one object, already fitted inside the unit cube."""

    family: str
    parts: tuple[Part, ...]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return bounds([p.shape for p in self.parts])

    def to_json(self) -> list[dict]:
        return [p.to_json() for p in self.parts]


def _rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _axis_to_z_rotation(axis: np.ndarray) -> np.ndarray:
    """A rotation whose local z axis is ``axis`` (for cylinders lying along a direction)."""
    z = axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def _uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform over SO(3): a normalised 4D Gaussian is a uniform unit quaternion."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _inscribed_radius(shape: Shape) -> float:
    """Radius of a ball centred at the shape's centre that lies inside it."""
    if isinstance(shape, Ellipsoid):
        return float(shape.radii.min())
    if isinstance(shape, Box):
        return float(shape.half_size.min())
    return float(min(shape.radius, shape.half_height))


def _random_shape(rng: np.random.Generator, center: np.ndarray, rotation: np.ndarray, size: np.ndarray) -> Shape:
    kind = ("ellipsoid", "box", "cylinder")[rng.integers(3)]
    if kind == "ellipsoid":
        return Ellipsoid(center=center, rotation=rotation, radii=size)
    if kind == "box":
        return Box(center=center, rotation=rotation, half_size=size * 0.85)  # boxes look bigger
    return Cylinder(center=center, rotation=rotation, radius=float(size[0]), half_height=float(size[2]))


def _family_random(rng: np.random.Generator) -> list[Shape]:
    """2-6 random primitives, each overlapping one placed before it, so the object is connected."""
    shapes: list[Shape] = []
    for k in range(int(rng.integers(2, 7))):
        size = rng.uniform(0.2, 0.55, size=3)
        shape = _random_shape(rng, np.zeros(3), _uniform_rotation(rng), size)
        if k:
            anchor = shapes[int(rng.integers(k))]
            # Centres closer than the sum of the inscribed radii guarantee an overlap.
            reach = _inscribed_radius(anchor) + _inscribed_radius(shape)
            offset = _unit_vector(rng) * reach * rng.uniform(0.5, 0.95)
            shape = replace(shape, center=anchor.center + offset)
        shapes.append(shape)
    return shapes


def _family_snowman(rng: np.random.Generator) -> list[Shape]:
    """2-4 stacked, shrinking balls; maybe a hat and a carrot nose."""
    shapes: list[Shape] = []
    radius, z = rng.uniform(0.45, 0.6), 0.0
    for k in range(int(rng.integers(2, 5))):
        if k:
            new_radius = radius * rng.uniform(0.6, 0.8)
            z += (radius + new_radius) * rng.uniform(0.7, 0.85)
            radius = new_radius
        radii = np.array([radius, radius, radius * rng.uniform(0.88, 1.0)])
        shapes.append(Ellipsoid(center=np.array([0.0, 0.0, z]), rotation=np.eye(3), radii=radii))
    if rng.random() < 0.6:  # hat: a short cylinder sunk into the top ball
        shapes.append(Cylinder(center=np.array([0.0, 0.0, z + 0.85 * radius]), rotation=np.eye(3),
                               radius=radius * rng.uniform(0.5, 0.7), half_height=radius * rng.uniform(0.3, 0.5)))
    if rng.random() < 0.6:  # nose: a thin cylinder sticking out horizontally
        angle = rng.uniform(0.0, 2.0 * math.pi)
        direction = np.array([math.cos(angle), math.sin(angle), 0.0])
        length = radius * rng.uniform(0.35, 0.6)
        shapes.append(Cylinder(center=np.array([0.0, 0.0, z]) + direction * (radius + 0.5 * length),
                               rotation=_axis_to_z_rotation(direction),
                               radius=radius * 0.15, half_height=0.5 * length + 0.2 * radius))
    return shapes


def _family_table(rng: np.random.Generator) -> list[Shape]:
    """A rectangular top on four legs, or a round top on a pedestal with a foot."""
    height = rng.uniform(0.5, 0.9)
    if rng.random() < 0.6:
        half = np.array([rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.8), rng.uniform(0.04, 0.08)])
        top = Box(center=np.array([0.0, 0.0, height]), rotation=np.eye(3), half_size=half)
        leg_radius = rng.uniform(0.06, 0.1)
        inset = leg_radius * rng.uniform(1.0, 2.0)
        legs = [Cylinder(center=np.array([sx * (half[0] - inset), sy * (half[1] - inset), height / 2.0]),
                         rotation=np.eye(3), radius=leg_radius, half_height=height / 2.0)
                for sx in (-1.0, 1.0) for sy in (-1.0, 1.0)]
        return [top, *legs]
    top_radius = rng.uniform(0.6, 0.9)
    top = Cylinder(center=np.array([0.0, 0.0, height]), rotation=np.eye(3),
                   radius=top_radius, half_height=rng.uniform(0.04, 0.08))
    pole = Cylinder(center=np.array([0.0, 0.0, height / 2.0]), rotation=np.eye(3),
                    radius=rng.uniform(0.07, 0.12), half_height=height / 2.0)
    foot = Cylinder(center=np.zeros(3), rotation=np.eye(3),
                    radius=top_radius * rng.uniform(0.35, 0.6), half_height=rng.uniform(0.03, 0.06))
    return [top, pole, foot]


def _family_tower(rng: np.random.Generator) -> list[Shape]:
    """2-6 boxes and cylinders stacked along z, each twisted about the vertical axis."""
    shapes: list[Shape] = []
    width, top = rng.uniform(0.4, 0.7), 0.0
    for k in range(int(rng.integers(2, 7))):
        half_height = rng.uniform(0.1, 0.3)
        center = np.array([0.0, 0.0, top + half_height])
        rotation = _rotation_z(rng.uniform(0.0, math.pi))
        if rng.random() < 0.5:
            half = np.array([width, width * rng.uniform(0.6, 1.0), half_height])
            shapes.append(Box(center=center, rotation=rotation, half_size=half))
        else:
            shapes.append(Cylinder(center=center, rotation=rotation, radius=width, half_height=half_height))
        top += 2.0 * half_height
        width *= rng.uniform(0.7, 0.95)
    return shapes


def _family_mushroom(rng: np.random.Generator) -> list[Shape]:
    """A stem under a flattened cap, sometimes on a base disc, sometimes leaning."""
    stem_half = rng.uniform(0.25, 0.45)
    lean = _axis_to_z_rotation(np.array([rng.normal(0, 0.15), rng.normal(0, 0.15), 1.0]))
    stem_axis = lean[:, 2]
    stem = Cylinder(center=stem_axis * stem_half, rotation=lean,
                    radius=rng.uniform(0.1, 0.2), half_height=stem_half)
    cap_radius = rng.uniform(0.45, 0.8)
    cap = Ellipsoid(center=stem_axis * 2.0 * stem_half, rotation=lean,
                    radii=np.array([cap_radius, cap_radius, cap_radius * rng.uniform(0.3, 0.55)]))
    shapes: list[Shape] = [stem, cap]
    if rng.random() < 0.5:
        shapes.append(Cylinder(center=np.zeros(3), rotation=np.eye(3),
                               radius=rng.uniform(0.3, 0.5), half_height=rng.uniform(0.04, 0.08)))
    return shapes


_FAMILY_BUILDERS = {
    "random": _family_random,
    "snowman": _family_snowman,
    "table": _family_table,
    "tower": _family_tower,
    "mushroom": _family_mushroom,
}


def _fit_in_cube(shapes: list[Shape]) -> list[Shape]:
    """Centre the exact bounding box on the origin and scale its largest half-side to OBJECT_FILL."""
    lo, hi = bounds(shapes)
    scale = OBJECT_FILL / float(((hi - lo) / 2.0).max())
    shift = -(lo + hi) / 2.0
    return [s.transformed(scale, shift) for s in shapes]


def _random_color(rng: np.random.Generator, hue: float) -> tuple[float, float, float]:
    # Value <= 0.9 keeps every lit surface strictly darker than a white background.
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.9))
    return (r, g, b)


def _random_texture(rng: np.random.Generator) -> Texture:
    hue = rng.random()
    color_a = _random_color(rng, hue)
    if rng.random() < 0.5:  # a contrasting hue
        color_b = _random_color(rng, hue + rng.uniform(0.25, 0.75))
    else:  # a darker shade of the same hue
        color_b = tuple(0.45 * c for c in color_a)
    return Texture(kind=TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))], color_a=color_a, color_b=color_b,
                   period=rng.uniform(0.25, 0.6), axis=int(rng.integers(3)), phase=rng.random())


def build_object(rng: np.random.Generator) -> SyntheticObject:
    """Draw a family, its shapes, fit them in the cube, then texture them (sizes are final then)."""
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    shapes = _fit_in_cube(_FAMILY_BUILDERS[family](rng))
    return SyntheticObject(family=family, parts=tuple(Part(shape=s, texture=_random_texture(rng)) for s in shapes))


def object_rng(seed: int, index: int) -> np.random.Generator:
    """The one random stream object ``index`` of dataset ``seed`` is drawn from."""
    return np.random.default_rng([seed, index])


def object_id(seed: int, index: int) -> str:
    return f"synthetic-s{seed}-{index:06d}"


# --------------------------------------------------------------------------------------------
# Cameras and samples
# --------------------------------------------------------------------------------------------


def camera_directions(rng: np.random.Generator, views: int) -> np.ndarray:
    """(V, 3) unit vectors: a Fibonacci sphere under a random rotation, in random order.

    The Fibonacci lattice spreads any number of views evenly; the random rotation makes every
    object's rig different; shuffling means the first few views are not all neighbours.
    """
    k = np.arange(views) + 0.5
    z = 1.0 - 2.0 * k / views
    phi = k * math.pi * (3.0 - math.sqrt(5.0))  # golden angle
    ring = np.sqrt(1.0 - z * z)
    directions = np.stack([ring * np.cos(phi), ring * np.sin(phi), z], axis=1) @ _uniform_rotation(rng).T
    return directions[rng.permutation(views)]


def camera_rig(rng: np.random.Generator, views: int, resolution: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(K (V, 3, 3), c2w (V, 4, 4)) of cameras at distance ``radius`` looking at the origin."""
    K = intrinsics_from_fov(resolution, resolution, math.radians(FOV_DEG))
    c2w = np.stack([look_at_c2w(radius * d, np.zeros(3), WORLD_UP) for d in camera_directions(rng, views)])
    return np.repeat(K[None], views, axis=0), c2w


def make_object(seed: int, index: int, views: int, resolution: int, image_format: str = "png",
                background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> ObjectSample:
    """Generate, render and encode object ``index`` of dataset ``seed``; a pure function of its args."""
    rng = object_rng(seed, index)
    obj = build_object(rng)
    lo, hi = obj.bounds()
    # The box is centred on the origin (see _fit_in_cube): its farthest corner bounds the object.
    distance = camera_radius(float(np.linalg.norm(np.maximum(np.abs(lo), np.abs(hi)))))
    intrinsics, c2w = camera_rig(rng, views, resolution, distance)
    background = tuple(float(c) for c in background)
    images = render(list(obj.parts), intrinsics, c2w, resolution, resolution, background)
    return ObjectSample(
        object_id=object_id(seed, index),
        images=[encode_image(image, image_format) for image in images],
        intrinsics=intrinsics,
        c2w=c2w,
        width=resolution,
        height=resolution,
        image_format=image_format,
        source=SOURCE,
        category=obj.family,
        scale=1.0,
        background=background,
        extra={
            "bbox": BBOX,
            "object_bbox": [lo.tolist(), hi.tolist()],
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "index": index,
            "fov_x_deg": FOV_DEG,
            "camera_radius": distance,
            "light_dir": LIGHT_DIR.tolist(),
            "parts": obj.to_json(),
        },
    )


# --------------------------------------------------------------------------------------------
# Split and dataset
# --------------------------------------------------------------------------------------------


def holdout_indices(objects: int, seed: int, fraction: float) -> frozenset[int]:
    """The objects held out: the ``round(fraction * objects)`` smallest hashes of (seed, index).

    At least one object is held out when ``fraction > 0`` and at least one stays in train when
    ``objects >= 2``. blake2b rather than ``hash()``: stable across processes and Python versions.
    """
    if objects <= 1 or fraction <= 0.0:
        return frozenset()
    count = min(objects - 1, max(1, round(fraction * objects)))
    keys = [hashlib.blake2b(f"{GENERATOR}/split/{seed}/{i}".encode(), digest_size=8).digest() for i in range(objects)]
    order = sorted(range(objects), key=lambda i: keys[i])
    return frozenset(order[:count])


@dataclass
class GenerationSummary:
    out: str
    objects: int
    train_objects: int
    holdout_objects: int
    views: int
    resolution: int
    seed: int
    image_format: str
    train_pattern: str
    holdout_pattern: str
    train_shards: list[str] = field(default_factory=list)
    holdout_shards: list[str] = field(default_factory=list)
    num_shards: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    objects_per_s: float = 0.0

    def describe(self) -> str:
        return "\n".join([
            f"synthetic: {self.objects} objects ({self.train_objects} train, {self.holdout_objects} holdout) "
            f"x {self.views} views at {self.resolution}x{self.resolution} {self.image_format}, seed {self.seed}",
            f"  {len(self.train_shards)} train + {len(self.holdout_shards)} holdout shards, "
            f"{self.num_bytes / 1e6:.1f} MB in {self.seconds:.1f} s ({self.objects_per_s:.1f} objects/s)",
            f"  train:   {self.train_pattern or '(none)'}",
            f"  holdout: {self.holdout_pattern or '(none)'}",
        ])


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may actually use
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def validate(objects: int, views: int, resolution: int, seed: int, holdout_fraction: float, workers: int,
             objects_per_shard: int, image_format: str, background) -> tuple[float, float, float]:
    """Raise ConfigError naming the flag of the first bad parameter; returns the background tuple."""
    checks = [
        (objects >= 1, f"--objects must be >= 1, got {objects}"),
        (views >= 1, f"--views must be >= 1, got {views}"),
        (resolution >= MIN_RESOLUTION, f"--resolution must be >= {MIN_RESOLUTION}, got {resolution}"),
        (seed >= 0, f"--seed must be >= 0, got {seed}"),
        (0.0 <= holdout_fraction < 1.0, f"--holdout-fraction must be in [0, 1), got {holdout_fraction}"),
        (workers >= 1, f"--workers must be >= 1, got {workers}"),
        (objects_per_shard >= 1, f"--objects-per-shard must be >= 1, got {objects_per_shard}"),
        (image_format in IMAGE_FORMATS, f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        color = tuple(float(c) for c in background)
    except (TypeError, ValueError):
        raise ConfigError(f"--background must be three numbers r,g,b in [0, 1], got {background!r}") from None
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise ConfigError(f"--background must be three numbers r,g,b in [0, 1], got {background!r}")
    return color


def generate_dataset(out: str, objects: int, views: int, resolution: int, seed: int = 0,
                     holdout_fraction: float = 0.1, workers: int | None = None, objects_per_shard: int = 64,
                     image_format: str = "png", background=(1.0, 1.0, 1.0), storage_options: dict | None = None,
                     progress: bool = True) -> dict:
    """Generate ``objects`` objects into ``out``/train-*.tar and ``out``/holdout-*.tar; returns a summary.

    The output does not depend on ``workers``: objects are made independently and written in
    index order (``Pool.imap`` keeps the order).
    """
    workers = _default_workers() if workers is None else workers
    background = validate(objects, views, resolution, seed, holdout_fraction, workers, objects_per_shard,
                          image_format, background)
    workers = min(workers, objects)
    held_out = holdout_indices(objects, seed, holdout_fraction)
    make = functools.partial(make_object, seed, views=views, resolution=resolution,
                             image_format=image_format, background=background)
    start = time.perf_counter()
    writers = {name: ShardWriter(out, name, max_objects=objects_per_shard, storage_options=storage_options)
               for name in ("train", "holdout")}
    bar = tqdm(total=objects, unit="obj", desc="synthetic", disable=not progress)
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context().Pool(workers)
            # Small chunks keep the workers busy to the end; >1 amortises the pickling round trip.
            samples = pool.imap(make, range(objects), chunksize=max(1, min(8, objects // (4 * workers))))
        else:
            samples = map(make, range(objects))
        for index, sample in enumerate(samples):
            writers["holdout" if index in held_out else "train"].write(sample)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # no-op cost after a full run; stops workers at once after an error
            pool.join()
        for writer in writers.values():
            writer.close()
    seconds = time.perf_counter() - start
    train, holdout = writers["train"], writers["holdout"]
    summary = GenerationSummary(
        out=out, objects=objects, train_objects=train.num_objects, holdout_objects=holdout.num_objects,
        views=views, resolution=resolution, seed=seed, image_format=image_format,
        train_pattern=train.pattern(), holdout_pattern=holdout.pattern(),
        train_shards=list(train.shard_urls), holdout_shards=list(holdout.shard_urls),
        num_shards=len(train.shard_urls) + len(holdout.shard_urls),
        num_bytes=train.num_bytes + holdout.num_bytes,
        seconds=seconds, objects_per_s=objects / seconds if seconds > 0 else float("inf"),
    )
    return asdict(summary) | {"summary": summary.describe()}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.synthetic",
        description="Generate procedural textured 3D objects, ray cast from V cameras, into train/holdout shards.")
    parser.add_argument("--out", required=True, help="output directory or fsspec URL (e.g. s3://bucket/synthetic)")
    parser.add_argument("--objects", type=int, required=True, help="number of objects")
    parser.add_argument("--views", type=int, required=True, help="views per object")
    parser.add_argument("--resolution", type=int, required=True, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="fraction of objects held out (default 0.1)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--objects-per-shard", type=int, default=64, help="objects per tar shard (default 64)")
    parser.add_argument("--image-format", default="png", help=f"one of {', '.join(IMAGE_FORMATS)} (default png)")
    parser.add_argument("--background", type=background_colour, default=(1.0, 1.0, 1.0),
                        help="background colour r,g,b in [0, 1] (default 1,1,1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser, ConfigError):
        summary = generate_dataset(
            out=args.out, objects=args.objects, views=args.views, resolution=args.resolution, seed=args.seed,
            holdout_fraction=args.holdout_fraction, workers=args.workers, objects_per_shard=args.objects_per_shard,
            image_format=args.image_format, background=args.background, progress=not args.no_progress)
    print(summary["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
