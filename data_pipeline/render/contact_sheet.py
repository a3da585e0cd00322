"""A contact sheet of rendered objects: per object a row of views, each above its mask.

    python -m data_pipeline.render.contact_sheet 'OUT/shard-*.tar' --out sheet.png [--views 6] [--size 96]
"""

from __future__ import annotations

import argparse
import io

from PIL import Image, ImageDraw

from data_pipeline import storage
from data_pipeline.cli_types import positive_int
from data_pipeline.schema import parse_sample
from data_pipeline.shards import iter_tar_groups


def contact_sheet(pattern: str, views: int = 6, size: int = 96, max_objects: int = 8) -> Image.Image:
    rows = []
    for url in storage.expand_urls(pattern):
        with storage.open_url(url, "rb") as f:
            for key, _, members in iter_tar_groups(f):
                rows.append(parse_sample(key, members, check_cameras=False))
    rows = sorted(rows, key=lambda s: s.object_id)[:max_objects]
    label = 14
    sheet = Image.new("RGB", (views * size, len(rows) * (2 * size + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, sample in enumerate(rows):
        top = r * (2 * size + label)
        draw.text((2, top + 1), f"{sample.object_id}  ({sample.extra.get('source_file', '').rsplit('/', 1)[-1]})", fill=(0, 0, 0))
        for v in range(min(views, sample.num_views)):
            view = Image.open(io.BytesIO(sample.images[v])).convert("RGB").resize((size, size), Image.LANCZOS)
            sheet.paste(view, (v * size, top + label))
            if sample.masks is not None:
                mask = Image.open(io.BytesIO(sample.masks[v])).convert("RGB").resize((size, size), Image.LANCZOS)
                sheet.paste(mask, (v * size, top + label + size))
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.render.contact_sheet", description=__doc__.split("\n")[0])
    p.add_argument("pattern", help="shard pattern (braces/globs, any URL)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--views", type=positive_int, default=6)
    p.add_argument("--size", type=positive_int, default=96, help="pixels per tile")
    p.add_argument("--max-objects", type=positive_int, default=8)
    args = p.parse_args(argv)
    image = contact_sheet(args.pattern, args.views, args.size, args.max_objects)
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # small PNG for a README
    with storage.open_url(args.out, "wb") as f:
        image.save(f, format="PNG", optimize=True)
    print(f"contact sheet: {args.out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
