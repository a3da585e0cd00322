"""Held-out evaluation end to end on a tiny random model: reconstruction, generation, and a real
2-process gloo run of the CLI that must agree with one process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data_pipeline.synthetic import generate_dataset
from model_zoo.evaluate import evaluate_generation, evaluate_reconstruction, main
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig
from model_zoo.lpips import LPIPS

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    summary = generate_dataset(out, objects=16, views=12, resolution=32, seed=0, holdout_fraction=0.5, workers=1,
                               progress=False)
    assert summary["holdout_objects"] == 8
    return summary["holdout_pattern"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GOEmbedFusion(ModelConfig(encode_resolution=16)).eval()


def lpips_weights(path: Path) -> str:
    """Random LPIPS weights in the documented file layout (as tests/test_goembedfusion.py does)."""
    reference = LPIPS()
    state = {key.replace("net.", "", 1): value for key, value in reference.state_dict().items() if key.startswith("net.")}
    state.update({f"lin{i}.model.1.weight": head.weight.abs() for i, head in enumerate(reference.heads)})
    torch.save(state, path)
    return str(path)


def test_reconstruction_metrics_and_lpips_only_with_weights(holdout, model, tmp_path):
    results = evaluate_reconstruction(model, holdout, context_views=3, resolution=32, batch_size=4)
    assert results["objects"] == 8 and results["resolution"] == 32
    assert math.isfinite(results["psnr"]) and 0 < results["psnr"] < 60
    assert math.isfinite(results["ssim"]) and -1 <= results["ssim"] <= 1
    assert results["lpips"] == "unavailable"
    assert 0 <= results["hue"] < results["truth_hue"]  # the synthetic objects are coloured; an untrained model is not
    with_lpips = evaluate_reconstruction(model, holdout, context_views=3, resolution=32, max_objects=3,
                                         lpips_weights=lpips_weights(tmp_path / "lpips.pt"))
    assert with_lpips["objects"] == 3 and isinstance(with_lpips["lpips"], float) and with_lpips["lpips"] > 0


def test_generation_gives_finite_fid_and_kid_with_random_features(holdout, model):
    results = evaluate_generation(model, holdout, features="random", views_per_object=10, steps=2, resolution=16,
                                  sample_resolution=16, max_objects=3, kid_subsets=10)
    assert results["objects"] == 3 and results["images"] == 30 and results["views_per_object"] == 10
    assert math.isfinite(results["fid"]) and results["fid"] > 0
    assert math.isfinite(results["kid"]) and math.isfinite(results["kid_std"])
    assert 0 < results["truth_coverage"] < 1 and 0 <= results["coverage"] <= 1
    # metrics.block_hue (tested there); NaN when no sample has a 4 x 4 block of object, as this untrained one
    assert 0 < results["truth_hue_4px"] < 1 and (math.isnan(results["hue_4px"]) or 0 <= results["hue_4px"] < 1)
    assert 0 < results["truth_object_hue"] < 1 and (math.isnan(results["object_hue"]) or 0 <= results["object_hue"] < 1)
    # Conditioned on context views: those views are left out of the 12, so 9 remain per object.
    conditioned = evaluate_generation(model, holdout, features="random", context_views=3, steps=2, resolution=16,
                                      max_objects=2, kid_subsets=5)
    assert conditioned["views_per_object"] == 9 and math.isfinite(conditioned["fid"])
    # Three images made one after another, at spread evaluation cameras: a different sample.
    made = evaluate_generation(model, holdout, features="random", views_per_object=10, steps=2, resolution=16,
                               sample_resolution=16, max_objects=3, kid_subsets=10, made_views=3)
    assert made["made_views"] == 3 and made["images"] == 30 and math.isfinite(made["fid"]) and made["fid"] != results["fid"]


def test_cli_refuses_generation_without_a_feature_extractor(holdout):
    with pytest.raises(SystemExit):
        main(["--model", "unused", "--data", holdout, "--task", "generation"])


# Runs the real CLI; only model_zoo.loading (written separately) is replaced by a stub that
# rebuilds the test's model from its saved weights.
LAUNCHER = textwrap.dedent("""
    import sys, types, torch
    from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig

    def load(path, device="cpu"):
        model = GOEmbedFusion(ModelConfig(encode_resolution=16))
        model.load_state_dict(torch.load(path + "/weights.pt", weights_only=True))
        return model.to(device)

    stub = types.ModuleType("model_zoo.loading")
    stub.load = load
    stub.ExportFormatError = type("ExportFormatError", (ValueError,), {})  # what evaluate's CLI catches
    sys.modules["model_zoo.loading"] = stub
    torch.set_num_threads(1)
    from model_zoo.evaluate import main
    sys.exit(main(sys.argv[1:]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_same_reconstruction_metrics_as_one_process(holdout, model, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save(model.state_dict(), model_dir / "weights.pt")
    launcher = tmp_path / "launch_eval.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "results.json"
    # 5 of 8 objects: rank 0 reads positions 0-3, rank 1 only position 4 of its 4-7.
    args = ["--model", str(model_dir), "--data", holdout, "--task", "reconstruction", "--context-views", "3",
            "--max-objects", "5", "--resolution", "32", "--batch-size", "2", "--out", str(out)]
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(launcher), *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    printed = json.loads(outputs[0][0])
    assert outputs[1][0] == ""  # only rank 0 reports
    assert json.loads(out.read_text()) == printed
    distributed = printed["reconstruction"]
    assert printed["world_size"] == 2 and distributed["objects"] == 5
    single = evaluate_reconstruction(model, holdout, context_views=3, max_objects=5, resolution=32, batch_size=4)
    for name in ("psnr", "ssim"):
        # Same objects and views; only the batching differs (a few float32 ulps).
        assert distributed[name] == pytest.approx(single[name], rel=1e-5, abs=1e-6)
    assert distributed["lpips"] == single["lpips"] == "unavailable"
