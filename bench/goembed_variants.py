"""GOEmbed variants: how much each carries (numerical rank of the encoding) and what it costs.

    python bench/goembed_variants.py [--threads 1] [--repeats 3]

Per representation (triplane, voxel grid, hash grid; tiny-preset sizes) and variant:

* ``zero origin``: ζ₀ = 0 and ψ reads only the feature (the closed form; rank ≤ 4 per block);
* ``+ positional ψ``: ψ also reads γ(x) (4 frequencies), so J = ∂ψ/∂f(0, x) varies with x;
* ``random origin``: a fixed random grid ζ₀ (std 0.1), so features and J vary along rays;
* ``learned origin``: the same, as a parameter (rank as random at initialisation; it needs
  ``create_graph`` to train, so its cost is the create_graph cost).

Rank: the encoding of one object from 4 views (random rays and colours), per block (plane /
grid / hash level) reshaped to channels × cells, counted as the singular values above 1e-6 of
the largest (fp64). Cost: time of GOEmbed with ``create_graph`` plus the backward of a loss on
ζ_enc into ψ (ψ trained through the encoder), and without, as ratios to one forward render of the
same rays, measured in the same process. Prints one JSON line. The machine is shared: ratios only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.model import Bench, random_rays  # noqa: E402
from model_zoo.goembed import RayBatch, closed_form_applies, goembed  # noqa: E402
from model_zoo.presets import get_preset  # noqa: E402
from model_zoo.renderer import FieldDecoder, VolumeRenderer  # noqa: E402
from model_zoo.representations import build_representation  # noqa: E402

VARIANTS = {
    "zero origin": ({}, {}),
    "+ positional psi": ({}, {"point_frequencies": 4}),
    "random origin": ({"origin": "random"}, {}),
    "learned origin": ({"origin": "learned"}, {}),
}


def build(kind: str, preset, origin: dict, decoder: dict) -> VolumeRenderer:
    torch.manual_seed(0)
    if kind == "hashgrid":
        representation = build_representation(kind, **origin)
    else:
        resolution = preset.triplane_resolution if kind == "triplane" else preset.voxel_resolution
        channels = preset.triplane_channels if kind == "triplane" else preset.voxel_channels
        representation = build_representation(kind, channels=channels, resolution=resolution, **origin)
    psi = FieldDecoder(representation.feature_dim, preset.decoder_hidden, preset.decoder_layers, **decoder)
    return VolumeRenderer(representation, psi, preset.samples_per_ray)


def block_ranks(renderer: VolumeRenderer, encoding: torch.Tensor) -> list[int]:
    """Numerical rank of each block of the encoding (one object), as channels × cells."""
    rep = renderer.representation
    state = encoding[0].double()
    if rep.kind == "triplane":
        blocks = [state[p].reshape(rep.channels, -1) for p in range(3)]
    elif rep.kind == "voxel":
        blocks = [state.reshape(rep.channels, -1)]
    else:  # hash grid (L, T, C)
        blocks = [state[level].T for level in range(rep.levels)]
    ranks = []
    for block in blocks:
        singular = torch.linalg.svdvals(block)
        ranks.append(int((singular > 1e-6 * singular.max().clamp_min(1e-300)).sum()))
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rays-per-object", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    bench = Bench(torch.device("cpu"), bf16=False, repeats=args.repeats, warmup=1)  # its median timer
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    generator = torch.Generator().manual_seed(0)
    origins, directions = random_rays(args.batch_size, args.rays_per_object, 1.0, generator, "cpu")
    colours = torch.rand(args.batch_size, args.rays_per_object, 3, generator=generator)
    background = torch.rand(args.batch_size, 3, generator=generator)
    rays = RayBatch(origins, directions, colours, 4)
    result = {"bench": "goembed_variants", "preset": args.preset, "threads": torch.get_num_threads(),
              "rays": args.batch_size * args.rays_per_object, "views": 4, "representations": {}}
    for kind in ("triplane", "voxel", "hashgrid"):
        entry = {}
        for name, (origin, decoder) in VARIANTS.items():
            renderer = build(kind, preset, origin, decoder)
            rep = renderer.representation
            # Rank in fp64, one object (the first), no normalisation: what the gradient spans.
            r64 = build(kind, preset, origin, decoder).double()
            one = RayBatch(origins[:1].double(), directions[:1].double(), colours[:1].double(), 4)
            ranks = block_ranks(r64, goembed(r64, one, background[:1].double(), normalisation="sum"))
            state = rep.origin(args.batch_size) + torch.randn(args.batch_size, *rep.state_shape, generator=generator)
            params = [p for p in renderer.parameters() if p.requires_grad]
            probe = torch.randn(args.batch_size, *rep.state_shape, generator=generator)

            def forward():
                with torch.no_grad():
                    renderer.render_rays(state, origins, directions, background)

            def encode(create_graph: bool):
                def run():
                    encoding = goembed(renderer, rays, background, create_graph=create_graph)
                    if create_graph:
                        torch.autograd.grad((encoding * probe).sum(), params, allow_unused=True)
                return run

            forward_s = bench.median_s(forward)
            plain_s, trained_s = bench.median_s(encode(False)), bench.median_s(encode(True))
            entry[name] = {
                "closed_form": closed_form_applies(renderer), "channels": rep.channels,
                "rank_per_block_max": max(ranks), "rank_per_block_min": min(ranks), "blocks": len(ranks),
                "forward_render_ms": round(forward_s * 1e3, 1),
                "goembed_vs_forward": round(plain_s / forward_s, 3),
                "goembed_trained_through_vs_forward": round(trained_s / forward_s, 3),
            }
            print(kind, name, entry[name], file=sys.stderr, flush=True)
        result["representations"][kind] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
