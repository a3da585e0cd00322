"""bf16 training on CPU (defect 3 of issue 10): the same code path as bf16 on GPUs.

DeepSpeed keeps the weights in bf16 (fp32 master copy in the optimizer); the trainer runs the
forward under autocast, so matmuls and convolutions run in bf16 while the batch, the cameras and
everything computed from them stay fp32. Deliberately fp32: the renderer's compositing (the
transmittance cumsum and exp: bf16's 8-bit mantissa would put ~1% errors into T after a few
dozen samples) and GOEmbed's normalisation (a division by small per-cell coverage sums).
"""

from __future__ import annotations

import math

import pytest
import torch

from model_zoo.goembed import RayBatch, goembed
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig
from model_zoo import renderer as renderer_module
from tests.dist_scenarios import run_ranks
from tests.test_trainer_accumulation import shards  # noqa: F401  (fixture)
from tests.test_trainer_collectives import small_settings


def test_bf16_trains_on_two_ranks_at_every_zero_stage(shards, tmp_path):  # noqa: F811
    stages = [0, 1, 2, 3]
    settings = small_settings(shards, **{"data.resolution": 16, "model.encode_resolution": 16, "model.rays_per_view": 32})
    reports = run_ranks(2, "precision", {"out": str(tmp_path), "stages": stages, "steps": 3, "settings": settings})
    for report in reports:
        for stage in stages:
            run = report[f"zero{stage}"]
            assert run["param_dtype"] == "torch.bfloat16", run
            assert all(math.isfinite(loss) for loss in run["losses"]), run
            assert run["optimizer_steps"] == 3 and run["skipped"] == 0, run


def test_bf16_trains_on_one_rank(shards, tmp_path):  # noqa: F811
    settings = small_settings(shards, **{"data.resolution": 16, "model.encode_resolution": 16, "model.rays_per_view": 32})
    (report,) = run_ranks(1, "precision", {"out": str(tmp_path), "stages": [0, 1, 2, 3], "steps": 2, "settings": settings})
    for stage in (0, 1, 2, 3):
        assert all(math.isfinite(loss) for loss in report[f"zero{stage}"]["losses"])
        assert report[f"zero{stage}"]["param_dtype"] == "torch.bfloat16"


def test_under_autocast_the_compositing_and_goembed_normalisation_stay_fp32(monkeypatch):
    torch.manual_seed(0)
    model = GOEmbedFusion(ModelConfig(encode_resolution=8, rays_per_view=16)).to(torch.bfloat16)
    seen = []
    original = renderer_module.composite

    def recording(density, colour, deltas, depths, background):
        seen.append((density.dtype, colour.dtype, deltas.dtype))
        return original(density, colour, deltas, depths, background)

    monkeypatch.setattr(renderer_module, "composite", recording)
    origins = torch.tensor([[[0.0, 0.0, -3.0]]]).expand(1, 64, 3).contiguous()
    directions = torch.nn.functional.normalize(torch.randn(1, 64, 3) * 0.1 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    colours = torch.rand(1, 64, 3)
    background = torch.ones(1, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.renderer.render_rays(model.representation.origin(1, device="cpu", dtype=torch.bfloat16),
                                         origins, directions, background)
        encoding = goembed(model.renderer, RayBatch(origins, directions, colours, 1), background, normalisation="coverage")
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen), seen
    assert out.rgb.dtype == torch.float32 and out.opacity.dtype == torch.float32
    assert encoding.dtype == torch.float32 and torch.isfinite(encoding).all()
