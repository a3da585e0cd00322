"""The run config: strict loading (unknown keys, types, values), overrides, saving without secrets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fsspec
import pytest
import yaml

from data_pipeline.reader import ReaderConfig
from trainer.config import (
    ConfigError,
    RunConfig,
    check_runnable,
    config_hash,
    load_config,
    save_config,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_validate():
    config = RunConfig()
    validate(config)
    assert config.model.preset == "tiny" and config.distributed.zero_stage == 2
    assert RunConfig.from_dict({}) == config


def test_tiny_cpu_yaml_loads():
    config = load_config(TINY, [])
    assert (config.model.preset, config.model.representation) == ("tiny", "triplane")
    assert (config.distributed.precision, config.distributed.zero_stage, config.train.device) == ("fp32", 2, "cpu")
    assert config.data.train_urls == "data/synthetic/train-*.tar"
    assert 100 <= config.train.max_steps <= 1000


def test_yaml_and_overrides_round_trip(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"optim": {"lr": 1e-3}, "data": {"batch_size": 2}})
    config = load_config(path, ["train.max_steps=7", "optim.betas=[0.5, 0.9]", "data.holdout_urls=null",
                                "log.tensorboard=false", "optim.weight_decay=1e-2", "model.encoder=zeros"])
    assert config.train.max_steps == 7
    assert config.optim.lr == 1e-3 and config.optim.weight_decay == 0.01
    assert config.optim.betas == (0.5, 0.9)  # a YAML list becomes the annotated tuple
    assert config.data.batch_size == 2 and config.data.holdout_urls is None
    assert config.log.tensorboard is False and config.model.encoder == "zeros"

    saved = str(tmp_path / "saved.yaml")
    save_config(config, saved)
    again = load_config(saved, [])
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert config_hash(config) != config_hash(RunConfig())


def test_overrides_without_file():
    config = load_config(None, ["train.max_steps=7", "run_dir=runs/x", "optim.lr=1"])
    assert config.train.max_steps == 7 and config.run_dir == "runs/x"
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)  # ints are fine floats


def test_unknown_fields_name_the_dotted_path_and_suggest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        RunConfig.from_dict({"optim": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"'model\.encodr'.*'model\.encoder'"):
        load_config(write_yaml(tmp_path / "bad.yaml", {"model": {"encodr": "goembed"}}), [])
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*'optim\.lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'trian'.*'train'"):
        load_config(None, ["trian.max_steps=1"])
    with pytest.raises(ConfigError, match=r"train\.max_steps is not a section"):
        load_config(None, ["train.max_steps.x=1"])


def test_malformed_override_names_it():
    with pytest.raises(ConfigError, match="train.max_steps7"):
        load_config(None, ["train.max_steps7"])


@pytest.mark.parametrize("override, words", [
    ("train.max_steps=abc", ["train.max_steps", "int", "abc"]),
    ("train.max_steps=2.5", ["train.max_steps", "int", "2.5"]),
    ("distributed.activation_checkpointing=3", ["distributed.activation_checkpointing", "bool", "3"]),
    ("distributed.activation_checkpointing='yes'", ["distributed.activation_checkpointing", "bool", "yes"]),
    ("optim.lr=true", ["optim.lr", "float", "True"]),
    ("optim.betas=[0.9]", ["optim.betas", "2 items"]),
    ("optim.betas=0.9", ["optim.betas", "tuple"]),
    ("data.resolution=big", ["data.resolution", "int | None", "big"]),
    ("data.storage_options=5", ["data.storage_options", "dict"]),
    ("distributed.precision=fp8", ["distributed.precision", "fp16", "fp8"]),
    ("data=3", ["data", "mapping"]),
    # bad values of the right type
    ("distributed.zero_stage=5", ["distributed.zero_stage must be 0, 1, 2 or 3, got 5"]),
    ("optim.lr=-1", ["optim.lr must be > 0"]),
    ("train.max_steps=0", ["train.max_steps must be >= 1"]),
    ("checkpoint.keep_last=0", ["checkpoint.keep_last must be >= 1"]),
    ("log.every_steps=0", ["log.every_steps must be >= 1"]),
    ("data.context_views_min=4", ["data.context_views_min", "data.context_views_max"]),
    ("model.encoder=magic", ["model.encoder", "magic"]),
    ("model.goembed_normalisation=magic", ["model.goembed_normalisation", "magic"]),
    ("model.context_dropout=2", ["model.context_dropout"]),
    ("model.preset=huge", ["model.preset", "huge"]),
    ("model.representation=mesh", ["model.representation", "mesh"]),
    ("distributed.backend=ncll", ["distributed.backend", "ncll"]),
])
def test_wrong_types_and_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    for word in words:
        assert word in str(error.value)


def test_validate_reports_every_problem_and_rechecks_edits():
    config = RunConfig()
    config.optim.lr = 0.0
    config.train.max_steps = 0
    config.model.encoder = "magic"  # edited after ModelConfig validated it
    with pytest.raises(ConfigError) as error:
        validate(config)
    message = str(error.value)
    assert "optim.lr" in message and "train.max_steps" in message and "model.encoder" in message
    assert "ModelConfig" not in message


def test_secrets_never_reach_the_saved_file(tmp_path):
    secret = "wJalrXUtnFEMI-very-secret"
    config = load_config(TINY, [f"data.storage_options.secret={secret}", "data.storage_options.key=AKIAEXAMPLE",
                                "data.storage_options.endpoint_url=http://127.0.0.1:8333"])
    assert config.data.storage_options["secret"] == secret  # the live config keeps it for the reader
    path = tmp_path / "saved.yaml"
    save_config(config, str(path))
    text = path.read_text()
    assert secret not in text and "AKIAEXAMPLE" not in text
    assert "http://127.0.0.1:8333" in text  # not a secret

    # Reloading drops the redacted values (the environment then supplies credentials).
    again = load_config(str(path), [])
    assert again.data.storage_options == {"endpoint_url": "http://127.0.0.1:8333"}
    # Credentials do not change a run's identity.
    assert config_hash(config) == config_hash(again)


def test_to_dict_is_plain_and_redaction_touches_nothing_else():
    config = RunConfig()
    raw = to_dict(config)
    assert raw["optim"]["betas"] == [0.9, 0.99]
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw
    # No regular field looks like a secret to storage.redact, so only credentials are hidden.
    assert raw == to_dict(config, redact_secrets=False)


def test_save_config_to_a_url():
    config = load_config(None, ["train.max_steps=11", "data.storage_options.token=tok-123"])
    url = "memory://configs-test/run/config.yaml"
    save_config(config, url)
    with fsspec.open(url, "r") as f:
        text = f.read()
    assert "tok-123" not in text
    assert load_config(url, []).train.max_steps == 11


def test_reader_config():
    data = load_config(None, ["data.batch_size=2", "data.storage_options.endpoint_url=http://x"]).data
    reader = data.reader_config(seed=5)
    assert isinstance(reader, ReaderConfig)
    assert (reader.urls, reader.batch_size, reader.seed, reader.shuffle) == (data.train_urls, 2, 5, True)
    assert reader.resolution == data.resolution and reader.storage_options == {"endpoint_url": "http://x"}
    holdout = data.reader_config(seed=5, holdout=True)
    assert holdout.urls == data.holdout_urls and not holdout.shuffle and not holdout.drop_last
    assert RunConfig().data.reader_config(0).storage_options is None  # the environment decides
    with pytest.raises(ConfigError, match="holdout_urls"):
        dataclasses.replace(data, holdout_urls=None).reader_config(0, holdout=True)


# -- what this machine cannot run: refused before any process group or engine exists ----------------


@pytest.mark.parametrize("overrides, cuda, field", [
    (["train.device=cuda"], False, "train.device=cuda"),
    (["distributed.precision=fp16", "train.device=cpu"], True, "distributed.precision=fp16"),
    (["distributed.precision=fp16"], False, "distributed.precision=fp16"),  # auto resolves to the CPU
    (["distributed.backend=nccl", "train.device=cpu"], True, "distributed.backend=nccl"),
])
def test_check_runnable_names_the_field(overrides, cuda, field):
    config = load_config(None, overrides)  # the config itself is valid: a GPU machine could run it
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_runnable(config, cuda_available=cuda)


def test_check_runnable_accepts_what_runs():
    check_runnable(load_config(None, ["train.device=cpu", "distributed.precision=bf16"]), cuda_available=False)
    check_runnable(load_config(None, ["train.device=cuda", "distributed.precision=fp16"]), cuda_available=True)


def test_launcher_refuses_cuda_without_cuda_before_starting_ranks():
    import subprocess
    import sys
    import time

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "launch/local.py", "--nproc", "2", "train.device=cuda"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "train.device=cuda but CUDA is not available" in result.stderr
    assert "deepspeed" not in result.stderr.lower() and "rank 0" not in result.stderr  # no rank was started
    assert time.monotonic() - started < 60


# -- what was saved before the move to pydantic still loads ------------------------------------------


def test_a_config_saved_before_pydantic_still_loads():
    old = load_config(str(REPO / "tests" / "data" / "config_saved_before_pydantic.yaml"), [])
    assert old == load_config(None, ["data.storage_options.endpoint_url=http://127.0.0.1:9"])
    assert old.data.storage_options == {"endpoint_url": "http://127.0.0.1:9"}  # the redacted secret left out


def test_a_model_config_json_written_before_pydantic_still_loads():
    from model_zoo.goembedfusion import ModelConfig
    from model_zoo.loading import ExportFormatError, model_config_from_dict

    # dataclasses.asdict(ModelConfig()) as the previous code wrote it into model_config.json
    old = json.loads('{"preset": "tiny", "representation": "triplane", "encoder": "goembed", "goembed_normalisation": '
                     '"coverage", "goembed_method": "auto", "goembed_origin": "zeros", "goembed_origin_scale": 0.1, '
                     '"decoder_point_frequencies": 0, "origin_density": 0.01, "encode_resolution": 32, "evidence": '
                     '"groups", "mode_flag": true, "train_decoder_through_encoder": true, "context_dropout": 0.1, '
                     '"reconstruction_prob": 0.5, "context_loss_weight": 1.0, "num_timesteps": 1000, "box_half_size": '
                     '1.0, "rays_per_view": null, "samples_per_ray": null, "mlp_hidden": 32, "lpips_weight": 0.0, '
                     '"lpips_weights_path": null, "lpips_patch_size": 32}')
    assert model_config_from_dict(old) == ModelConfig()
    # and is written the same way, plus the fields added since (at defaults that mean the old behaviour)
    assert json.loads(json.dumps(dataclasses.asdict(ModelConfig()))) == {**old, "goembed_log_density": False, "image_colour": False,
                                                                        "image_colour_noisy_target": False, "image_colour_levels": 1,
                                                                        "image_colour_noisy_gain": "learned",
                                                                        "image_colour_own_view": False, "image_colour_own_level": 0,
                                                                        "image_colour_adaptive_prior": False,
                                                                        "image_colour_view_denoiser": False,
                                                                        "image_colour_view_denoiser_loss_weight": 1.0,
                                                                        "image_colour_view_denoiser_all_views": False}
    with pytest.raises(ExportFormatError, match=r"model_config\.json is not a valid ModelConfig: encoder: .*'magic'"):
        model_config_from_dict({**old, "encoder": "magic"})


# -- strict types, and errors in the sections pydantic checks for us ----------------------------------


@pytest.mark.parametrize("override, message", [
    ("distributed.zero_stage=true", "distributed.zero_stage must be int, got True (bool)"),
    ("model.mode_flag=1", "model.mode_flag must be bool, got 1 (int)"),
    ("data.batch_size='4'", "data.batch_size must be int, got '4' (str)"),
    ("data.target_views=0", "data.target_views must be >= 1, got 0"),  # the reader allows 0; training does not
    ("data.piece_objects=0", "data.piece_objects must be >= 1, got 0"),  # a reader field, embedded
    ("model.lpips_weight=0.5", "model.lpips_weights_path is required when model.lpips_weight > 0"),
    ("optim.betas=[1.5, 0.9]", "optim.betas[0] must be < 1"),
    ("model.image_colour_own_view=true", "model.image_colour_own_view needs model.image_colour: true"),
    ("model.image_colour_own_level=1", "model.image_colour_own_level must be < model.image_colour_levels (1), got 1"),
    ("model.image_colour_view_denoiser=true", "model.image_colour_view_denoiser needs model.image_colour_noisy_target: true"),
    ("data.holdout_urls=''", "data.holdout_urls must not be empty"),
])
def test_strict_values_and_one_line_messages(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_unknown_reader_field_in_data_suggests():
    with pytest.raises(ConfigError, match=r"unknown config field 'data\.bach_size' \(did you mean 'data\.batch_size'\?\)"):
        RunConfig.from_dict({"data": {"bach_size": 2}})


# -- documentation generated from the declarations -----------------------------------------------


def leaf_fields(cls, path=""):
    """(dotted name, pydantic FieldInfo) of every field that is not a section."""
    for f in dataclasses.fields(cls):
        info = cls.__pydantic_fields__[f.name]
        dotted = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(info.annotation):
            yield from leaf_fields(info.annotation, dotted)
        else:
            yield dotted, info


def test_every_field_is_documented_and_listed_by_help():
    from launch.local import build_parser as local_parser
    from launch.ray_job import build_parser as ray_parser
    from launch.slurm import build_parser as slurm_parser
    from trainer.config import config_help
    from trainer.train import build_parser as train_parser

    fields = list(leaf_fields(RunConfig))
    assert len(fields) > 60
    undocumented = [name for name, info in fields if not info.description]
    assert not undocumented
    text, defaults = config_help(), to_dict(RunConfig(), redact_secrets=False)
    for name, info in fields:
        default = json.dumps(_value_at(defaults, name))
        assert f"  {name} = {default}  [" in text, name
    for parser in (train_parser(), slurm_parser(), ray_parser(), local_parser()):
        assert text in parser.format_help()


def _value_at(raw, dotted):
    for part in dotted.split("."):
        raw = raw[part]
    return raw



@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "tiny_cpu_long.yaml"])
def test_bundled_configs_list_every_field(name):
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    assert sorted(dotted for dotted, _ in leaf_fields(RunConfig)) == sorted(flatten(raw))


def flatten(raw, path=""):
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(value, dict) and key != "storage_options":
            yield from flatten(value, dotted)
        else:
            yield dotted


@pytest.mark.parametrize("num_parameters", [1_365_231, 2_000_001, 999])
def test_zero_buckets_are_aligned_for_any_parameter_count(num_parameters):
    # An odd parameter count made DeepSpeed refuse to start ("allgather_bucket_size must be a
    # multiple of nccl_start_alignment_factor, 2"): the bucket is rounded up, never below the model.
    from trainer.engine import BUCKET_ALIGNMENT, deepspeed_config
    zero = deepspeed_config(RunConfig(), num_parameters)["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        assert zero[key] % BUCKET_ALIGNMENT == 0 and zero[key] % 2 == 0
        assert zero[key] >= min(num_parameters, 5e8)
