"""Model export: real checkpoints from the real trainer (2 processes, ZeRO-2 and ZeRO-3) -> export -> load.

Every checkpoint carries portable weights (trainer/portable.py); the export reads only those. The
tests compare them with what is known independently: DeepSpeed's own consolidation of its shards
(trained weights) and the per-rank EMA partitions in the trainer's state files (the EMA).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import model_zoo
from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.synthetic import generate_dataset
from model_zoo.export import ExportError, export, resolve_checkpoint
from model_zoo.goembedfusion import GOEmbedFusion, Views
from model_zoo.loading import ExportFormatError
from tests.test_trainer import settings
from trainer.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "step_00000003"
EXPORT_FILES = {"model.safetensors", "model_config.json", "config.yaml", "MODEL_CARD.md"}
# stage -> ema_decay; "3-decay0": ZeRO-3 with an EMA decay so small that the EMA is the weights
# (optim.ema_decay=0 turns the EMA off altogether), which checks the reassembly of its partitions.
RUNS = {"2": 0.5, "3": 0.5, "3-decay0": 1e-12}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 3-step, 2-process runs through the real launcher, started together to save wall time."""
    root = tmp_path_factory.mktemp("export_runs")
    summary = generate_dataset(str(root / "data"), objects=24, views=6, resolution=32, seed=3,
                               holdout_fraction=0.25, progress=False)
    shards = summary["train_pattern"], summary["holdout_pattern"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The shared-memory all-reduce op DeepSpeed JIT-builds on the first comm init (~30 s cold): cache it.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "goembed_torch_extensions"))
    processes, dirs = {}, {}
    for name, decay in RUNS.items():
        dirs[name] = str(root / f"zero{name}")
        args = settings(shards, dirs[name], **{"distributed.zero_stage": int(name[0]), "train.max_steps": 3,
                                               "checkpoint.every_steps": 3, "optim.ema_decay": decay,
                                               "data.num_workers": 0})
        processes[name] = subprocess.Popen([sys.executable, "launch/local.py", "--nproc", "2", *args], cwd=ROOT, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, process in processes.items():
        _, err = process.communicate(timeout=400)
        assert process.returncode == 0, f"run {name}: {err[-4000:]}"
    return {"shards": shards, **dirs}


@pytest.fixture(scope="module")
def batch(runs):
    """A fixed held-out batch: 2 objects, 2 context views, 1 target view, 32 px."""
    reader = StreamingReader(ReaderConfig(urls=runs["shards"][1], batch_size=2, context_views_min=2, context_views_max=2,
                                          target_views=1, resolution=32, num_workers=0, seed=0, shuffle=False,
                                          drop_last=False), rank=0, world_size=1)
    return next(iter(reader))


@pytest.fixture(scope="module")
def plain(runs, tmp_path_factory):
    """The --no-ema export of each run, made once: {run name: directory}."""
    root = tmp_path_factory.mktemp("plain_exports")
    made = {}
    for name in RUNS:
        result = export(runs[name], str(root / name), ema=False)
        assert (result.step, result.weights, result.zero_stage, result.world_size) == (3, "trained", int(name[0]), 2)
        made[name] = root / name
    return made


def outputs(model: GOEmbedFusion, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """reconstruct + render on the fixed batch."""
    dtype = next(model.parameters()).dtype
    context = Views.from_batch(batch, "context").to(dtype)
    background = batch.background.to(dtype)
    state = model.reconstruct(context, background)
    image = model.render(state, batch.target_K.to(dtype), batch.target_c2w.to(dtype), 32, 32, background)
    return state, image


def training_model(run_dir: str) -> GOEmbedFusion:
    """GOEmbedFusion with the consolidated fp32 weights, straight from DeepSpeed's own tool (our files: trusted)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = os.path.join(run_dir, "checkpoints")
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoints, TAG)
    model = GOEmbedFusion(load_config(os.path.join(checkpoints, TAG, "config.yaml")).model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def weights(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "model.safetensors"))


def trainer_ema(run_dir: str, rank: int) -> dict[str, torch.Tensor]:
    path = os.path.join(run_dir, "checkpoints", TAG, f"trainer_rank{rank:05d}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["ema"]


@pytest.mark.parametrize("stage", ["2", "3"])
def test_no_ema_export_loads_to_the_training_models_outputs(runs, plain, batch, stage):
    loaded = model_zoo.load(str(plain[stage]))
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    reference = training_model(runs[stage])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    got, want = outputs(loaded, batch), outputs(reference, batch)
    assert got[1].shape == (2, 1, 3, 32, 32)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("stage", ["2", "3"])
def test_ema_export_is_the_ema(runs, plain, batch, tmp_path, stage):
    result = export(runs[stage], str(tmp_path / "ema"))
    assert result.weights == "ema" and not result.warnings
    trained = model_zoo.load(str(plain[stage]))
    base, ema = weights(plain[stage]), weights(tmp_path / "ema")
    assert base.keys() == ema.keys()
    assert all(ema[k].shape == base[k].shape for k in base)
    assert not all(torch.equal(ema[k], base[k]) for k in base)  # decay 0.5 over 3 steps: not the weights
    if stage == "2":  # ZeRO 0-2: every rank's EMA holds whole tensors
        saved = trainer_ema(runs[stage], 0)
        assert all(torch.equal(ema[k], saved[k]) for k in base)
    else:  # ZeRO-3: rank r's EMA is chunk r of the flattened, padded parameter
        parts = [trainer_ema(runs[stage], rank) for rank in (0, 1)]
        for name, tensor in ema.items():
            flat, chunk = tensor.flatten(), -(-tensor.numel() // 2)
            assert parts[0][name].shape == parts[1][name].shape == (chunk,)
            assert torch.equal(flat[:chunk], parts[0][name])
            assert torch.equal(flat[chunk:], parts[1][name][:tensor.numel() - chunk])
    state, image = outputs(model_zoo.load(str(tmp_path / "ema")), batch)
    assert torch.isfinite(image).all() and not torch.equal(image, outputs(trained, batch)[1])


def test_zero3_ema_reassembled_from_partitions_equals_the_weights_at_decay_zero(runs, plain, tmp_path):
    result = export(runs["3-decay0"], str(tmp_path / "ema"))
    assert result.weights == "ema"
    base, ema = weights(plain["3-decay0"]), weights(tmp_path / "ema")
    assert base.keys() == ema.keys()
    for name in base:
        torch.testing.assert_close(ema[name], base[name], rtol=0, atol=1e-6, msg=name)


def test_old_checkpoint_is_refused_then_converted_by_the_trainer_tool(runs, plain, tmp_path):
    old = tmp_path / "checkpoints" / TAG
    shutil.copytree(os.path.join(runs["3"], "checkpoints", TAG), old)
    manifest = json.loads((old / "MANIFEST.json").read_text())
    for name in ("model.safetensors", "model_trained.safetensors", "model_config.json"):  # as written before
        os.remove(old / name)
        del manifest["files"][name]
    (old / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=f"python -m trainer.portable {old}"):
        export(str(old), str(tmp_path / "refused"))
    with pytest.raises(ExportFormatError, match="trainer.portable"):
        model_zoo.load(str(old))
    result = subprocess.run([sys.executable, "-m", "trainer.portable", str(old)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    export(str(old), str(tmp_path / "converted"), ema=False)
    export(str(old), str(tmp_path / "converted_ema"))
    export(runs["3"], str(tmp_path / "original_ema"))
    for converted, original in ((tmp_path / "converted", plain["3"]), (tmp_path / "converted_ema", tmp_path / "original_ema")):
        a, b = weights(converted), weights(original)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_needs_neither_deepspeed_nor_the_trainer(runs, tmp_path):
    code = ("import sys, model_zoo\n"
            "from model_zoo.export import export\n"
            f"export({runs['3']!r}, {str(tmp_path / 'out')!r})\n"
            f"model_zoo.load({os.path.join(runs['3'], 'checkpoints', TAG)!r})\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'trainer'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_checkpoint_directory_loads_directly(runs, plain, tmp_path):
    tag_dir = os.path.join(runs["2"], "checkpoints", TAG)
    trained = model_zoo.load(tag_dir, weights="trained")
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in weights(plain["2"]).items())
    export(runs["2"], str(tmp_path / "ema"))
    averaged = model_zoo.load(tag_dir)
    assert all(torch.equal(averaged.state_dict()[k], v) for k, v in weights(tmp_path / "ema").items())


def test_export_directory_has_no_pickle_and_a_model_card(runs, tmp_path):
    out = tmp_path / "export"
    export(runs["2"], str(out))
    found = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, out)] = f.read(4)
    assert set(found) == EXPORT_FILES
    for name, head in found.items():
        assert os.path.splitext(name)[1] in (".safetensors", ".json", ".yaml", ".md"), name
        assert not head.startswith(b"\x80"), f"{name} starts like a pickle"
        assert not head.startswith(b"PK"), f"{name} is a zip (torch.save's format)"
    assert load_config(str(out / "config.yaml")).distributed.zero_stage == 2
    card = (out / "MODEL_CARD.md").read_text()
    assert "step **3**" in card and "| loss |" in card and "EMA of the weights (decay 0.5)" in card
    assert f"python -m model_zoo.export {os.path.abspath(runs['2'])} {out}" in card or f"model_zoo.export {runs['2']} {out}" in card
    assert runs["shards"][0] in card
    with open(os.path.join(runs["2"], "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    assert f"| loss | {last['loss']:.6g} |" in card
    assert json.loads((out / "model_config.json").read_text())["rays_per_view"] == 64


def test_bf16_export_halves_the_weights(runs, batch, tmp_path):
    export(runs["2"], str(tmp_path / "fp32"))
    export(runs["2"], str(tmp_path / "bf16"), dtype="bf16")
    fp32_size = os.path.getsize(tmp_path / "fp32" / "model.safetensors")
    bf16_size = os.path.getsize(tmp_path / "bf16" / "model.safetensors")
    assert 0.45 < bf16_size / fp32_size < 0.55, (bf16_size, fp32_size)
    full, half = weights(tmp_path / "fp32"), weights(tmp_path / "bf16")
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].bfloat16()) for k in full)
    assert next(model_zoo.load(str(tmp_path / "bf16")).parameters()).dtype == torch.bfloat16
    upcast = model_zoo.load(str(tmp_path / "bf16"), dtype=torch.float32)
    assert next(upcast.parameters()).dtype == torch.float32
    assert torch.isfinite(outputs(upcast, batch)[1]).all()


def test_sources_out_dirs_and_errors(runs, tmp_path):
    run_dir = runs["2"]
    checkpoints = os.path.join(run_dir, "checkpoints")
    expected = (os.path.abspath(checkpoints), TAG)
    assert resolve_checkpoint(run_dir) == resolve_checkpoint(checkpoints) == expected
    assert resolve_checkpoint(os.path.join(checkpoints, TAG)) == expected
    with pytest.raises(ExportError, match="not a run directory"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(run_dir, str(tmp_path / "busy"))
    with pytest.raises(ExportFormatError, match="pass one checkpoint's directory"):
        model_zoo.load(checkpoints)


def test_a_step_directory_without_its_manifest_is_refused_never_another_step(runs, tmp_path):
    """A half-written save must not be exported, nor silently replaced by the run's `latest`."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(os.path.join(runs["2"], "checkpoints"), elsewhere)
    half = tmp_path / "run" / "step_00000009"
    shutil.copytree(elsewhere / TAG, half)
    os.remove(half / "MANIFEST.json")
    config = yaml.safe_load((half / "config.yaml").read_text())
    config["checkpoint"]["dir"] = str(elsewhere)  # its config points at a directory with a complete `latest`
    (half / "config.yaml").write_text(yaml.safe_dump(config))
    for source in (half, tmp_path / "renamed"):
        if source != half:
            shutil.copytree(half, source)
        with pytest.raises(ExportError, match="has no MANIFEST.json: that checkpoint was never completed"):
            export(str(source), str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def test_export_from_s3_checkpoint_with_the_command(runs, plain, tmp_path, s3_server, s3_bucket, s3_env):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options())
    base = s3_bucket.split("://", 1)[1] + "/run/checkpoints"
    local = os.path.join(runs["3"], "checkpoints")
    for name in os.listdir(os.path.join(local, TAG)):
        fs.put(os.path.join(local, TAG, name), f"{base}/{TAG}/{name}")
    fs.pipe(f"{base}/latest", (TAG + "\n").encode())

    result = subprocess.run([sys.executable, "-m", "model_zoo.export", f"{s3_bucket}/run/checkpoints", str(tmp_path / "s3"),
                             "--no-ema"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["weights"] == "trained"
    remote, here = weights(tmp_path / "s3"), weights(plain["3"])
    assert remote.keys() == here.keys() and all(torch.equal(remote[k], here[k]) for k in here)
    assert s3_server.secret_key not in (tmp_path / "s3" / "MODEL_CARD.md").read_text()

    # An export on S3 loads from its URL too.
    for name in EXPORT_FILES:
        fs.put(str(tmp_path / "s3" / name), f"{s3_bucket.split('://', 1)[1]}/exports/z3/{name}")
    loaded = model_zoo.load(f"{s3_bucket}/exports/z3")
    assert all(torch.equal(loaded.state_dict()[k], here[k]) for k in here)
