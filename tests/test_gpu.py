"""CUDA correctness (issue 10, item 10): run by ``bench/gpu_check.sh`` on a GPU machine.

On a machine without CUDA every test marked ``gpu`` is skipped with the reason shown (``pytest
-ra``); the last test (not marked) runs bench/gpu.py's code on the CPU. Each ``gpu`` test compares the CUDA result with the CPU result of the same computation, or trains a few real
steps on one GPU over NCCL (world size 1) at fp32 and bf16 under ZeRO 0, 2 and 3.
"""

from __future__ import annotations

import math

import pytest
import torch

from model_zoo.goembed import RayBatch, goembed
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: bench/gpu_check.sh runs these on a GPU machine")


def rays(count: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    origins = torch.tensor([0.0, 0.0, -3.0]).expand(1, count, 3).contiguous()
    directions = torch.nn.functional.normalize(
        torch.randn(1, count, 3, generator=generator) * 0.15 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    colours = torch.rand(1, count, 3, generator=generator)
    return origins, directions, colours, torch.ones(1, 3)


@pytest.mark.parametrize("representation", ["triplane", "voxel"])
@gpu
@needs_cuda
def test_renderer_and_goembed_on_cuda_match_the_cpu(representation):
    torch.manual_seed(0)
    model = GOEmbedFusion(ModelConfig(representation=representation, encode_resolution=16, rays_per_view=64)).eval()
    state = torch.randn(1, *model.representation.state_shape) * 0.5
    origins, directions, colours, background = rays()
    cpu = model.renderer.render_rays(state, origins, directions, background)
    cpu_encoding = goembed(model.renderer, RayBatch(origins, directions, colours, 1), background)
    model.cuda()
    moved = [t.cuda() for t in (state, origins, directions, colours, background)]
    gpu = model.renderer.render_rays(moved[0], moved[1], moved[2], moved[4])
    gpu_encoding = goembed(model.renderer, RayBatch(moved[1], moved[2], moved[3], 1), moved[4])
    torch.testing.assert_close(gpu.rgb.cpu(), cpu.rgb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.opacity.cpu(), cpu.opacity, rtol=1e-4, atol=1e-5)
    scale = float(cpu_encoding.abs().max())
    torch.testing.assert_close(gpu_encoding.cpu(), cpu_encoding, rtol=1e-3, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_pipeline.synthetic import generate_dataset

    out = str(tmp_path_factory.mktemp("data"))
    return generate_dataset(out, objects=16, views=4, resolution=32, seed=1, holdout_fraction=0.0,
                            progress=False)["train_pattern"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 2, 3])
@gpu
@needs_cuda
def test_training_steps_on_one_gpu_over_nccl(shards, tmp_path, precision, stage):
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.trainer import Trainer

    values = {"run_dir": str(tmp_path / "run"), "data.train_urls": shards, "data.holdout_urls": "null",
              "data.batch_size": 2, "data.resolution": 32, "data.num_workers": 0, "model.encode_resolution": 16,
              "model.rays_per_view": 64, "log.tensorboard": "false", "train.device": "cuda",
              "distributed.zero_stage": stage, "distributed.precision": precision}
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in values.items()]))
    assert dist.get_backend() == "nccl" and trainer.env.device.type == "cuda"
    losses = [float(trainer.train_step(trainer.next_micro_batches()[0]).metrics["loss"]) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert trainer.engine.global_steps == 3
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert next(trainer.engine.module.parameters()).dtype == expected
    trainer.save()  # portable weights gathered on the GPU (ZeRO-3: all-gathers over NCCL)
    trainer.engine.destroy()


def test_the_gpu_benchmark_script_runs_its_code_on_the_cpu():
    """Not a GPU figure: bench/gpu.py --cpu-smoke runs the same code on the CPU, so the one GPU
    run a lent machine gets is not spent on a bug in the script."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "bench/gpu.py", "--cpu-smoke", "--presets", "tiny", "--resolutions", "32",
                             "--steps", "2", "--warmup", "1", "--objects", "8", "--batch-size", "2"], cwd=root,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    (run,) = report["runs"]
    assert "error" not in run, run
    assert report["device"].startswith("cpu") and run["denoiser_mfu"] is None
    assert run["step_seconds_median"] > 0 and run["rays_per_s"] > 0 and run["denoiser_flops_per_step"] > 0
    assert 0 <= run["data_wait_fraction"] < 1
