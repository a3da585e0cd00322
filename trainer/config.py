"""One typed configuration for a whole training run.

    config = load_config("configs/tiny_cpu.yaml", ["train.max_steps=7", "optim.lr=1e-3"])
    save_config(config, "runs/tiny/config.yaml")      # secrets redacted; s3:// works too
    config_hash(config)                                # short id of the run's settings

A run is described by nested dataclasses (data, model, optim, distributed, checkpoint, log, train).
Plain dicts, as YAML gives them, become dataclasses through :meth:`RunConfig.from_dict`, which is
strict on purpose: a misspelt key or a value of the wrong type is an error naming the dotted field
(``optim.lrr``), never a silently ignored setting discovered after a day of GPU time. Value checks
live in :func:`validate`, which every loading path calls.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import yaml

from data_pipeline import storage
from data_pipeline.reader import ReaderConfig
from model_zoo.goembedfusion import ModelConfig
from model_zoo.presets import get_preset
from model_zoo.representations import REPRESENTATIONS

log = logging.getLogger("trainer.config")

Precision = Literal["fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
# torch.distributed's built-in backends; a typo ("ncll") should fail here, not at rendezvous.
BACKENDS = ("nccl", "gloo", "mpi", "ucc")
REDACTED = "***"  # what data_pipeline.storage.redact puts in place of a secret


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the dotted field (``optim.lr``)."""


# -- the sections -------------------------------------------------------------------------------


@dataclass
class DataConfig:
    train_urls: str = "data/synthetic/train-*.tar"  # brace pattern / glob, local or any fsspec URL
    holdout_urls: str | None = "data/synthetic/holdout-*.tar"  # None: no held-out evaluation
    batch_size: int = 4  # objects per micro-batch, per rank
    context_views_min: int = 0  # k is drawn per batch from [min, max]; 0 trains the unconditional case
    context_views_max: int = 3
    target_views: int = 2  # the first is noised and encoded; the others are never encoded (DFM)
    resolution: int | None = 64  # width the views are decoded at; None = as stored
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_block_objects: int = 64
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint_url, key, secret, ...)
    storage_retry_seconds: float = 300.0  # an object-storage outage longer than this ends the run

    def reader_config(self, seed: int, holdout: bool = False) -> ReaderConfig:
        """The streaming reader's settings: training shards (shuffled), or the held-out ones in order."""
        if holdout and self.holdout_urls is None:
            raise ConfigError("data.holdout_urls is null, so there is no held-out reader")
        return ReaderConfig(
            urls=self.holdout_urls if holdout else self.train_urls,
            batch_size=self.batch_size,
            context_views_min=self.context_views_min,
            context_views_max=self.context_views_max,
            target_views=self.target_views,
            resolution=self.resolution,
            num_workers=self.num_workers,
            seed=seed,
            # Evaluation must see every held-out object, in the same order in every run.
            shuffle=not holdout,
            drop_last=not holdout,
            shuffle_block_objects=self.shuffle_block_objects,
            # The reader treats None as "use the environment (AWS_* variables)".
            storage_options=dict(self.storage_options) or None,
        )


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate, reached after the warm-up (the tiny embedded run; DFM used 2e-5 at scale)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    lr_warmup_steps: int = 100  # linear warm-up from 0
    lr_min_ratio: float = 0.1  # cosine decay ends at lr * lr_min_ratio at train.max_steps
    ema_decay: float = 0.99  # 0 disables the EMA copy of the weights; ~100 steps: the default run is 1000 steps


@dataclass
class DistributedConfig:
    zero_stage: int = 2  # DeepSpeed ZeRO stage, 0..3
    # bf16: matmuls and convolutions in bf16 under autocast, fp32 master weights in the optimizer;
    # the renderer's compositing and GOEmbed's normalisation stay fp32 (README, "Precision").
    # fp16 needs a GPU (refused at start-up otherwise, see check_runnable).
    precision: Precision = "fp32"
    gradient_accumulation_steps: int = 1
    activation_checkpointing: bool = False
    backend: str | None = None  # None: nccl on CUDA, gloo otherwise


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 3  # older checkpoints are deleted
    dir: str | None = None  # None: <run_dir>/checkpoints; any fsspec URL (s3://...) works
    resume: bool = True  # resume automatically from the `latest` checkpoint in dir


@dataclass
class LogConfig:
    every_steps: int = 10  # scalar metrics
    preview_every_steps: int = 200  # rendered previews; 0 disables them
    tensorboard: bool = True
    turntable_frames: int = 24  # frames of the turntable preview


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (each of distributed.gradient_accumulation_steps micro-batches)
    seed: int = 0
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    device: Device = "auto"  # auto: cuda if available, else cpu


@dataclass
class RunConfig:
    run_dir: str = "runs/tiny"  # local path or fsspec URL; checkpoints, logs and the saved config go here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """A validated config from plain (YAML-like) data; missing keys keep their defaults."""
        config = _build(cls, raw, "")
        validate(config)
        return config


# -- building dataclasses from plain data, with type checks ---------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints, not Field.type: with `from __future__ import annotations` (as in
    # model_zoo/goembedfusion.py) Field.type is only a string.
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if name in names}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unknown(path: str, name: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
    return ConfigError(f"unknown config field '{_join(path, name)}'{hint}")


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping of fields, got {raw!r}")
    hints = _hints(cls)
    values = {}
    for name, value in raw.items():
        if name not in hints:
            raise _unknown(path, str(name), hints)
        values[name] = _convert(value, hints[name], _join(path, name))
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        # Dataclasses such as ModelConfig validate themselves and say "ModelConfig.encoder";
        # say "model.encoder" instead, the name the user wrote in the YAML file.
        message = str(error).replace(f"{cls.__name__}.", f"{path}." if path else "")
        if not (path and message.startswith(f"{path}.")):
            message = f"{path or 'config'}: {message}"
        raise ConfigError(message) from None


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked against the annotation ``hint`` (and lists turned into tuples where wanted)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> ConfigError:
        return ConfigError(f"{path} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")

    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # `X | None`
        for arm in args:
            try:
                return _convert(value, arm, path)
            except ConfigError:
                pass
        raise wrong()
    if origin is Literal:
        # `type(...) is` so that True does not pass for 1 (bool is a subclass of int).
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):  # YAML has no tuples: a list stands for one
            raise wrong()
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path} must have {len(args)} items ({_type_name(hint)}), got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise wrong()
        if not args:
            return dict(value)
        return {_convert(k, args[0], f"{path} key"): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        # Exactly bool: `activation_checkpointing: 3` or `"yes"` (quoted) is a mistake, not True.
        if type(value) is bool:
            return value
        raise wrong()
    if hint is int:
        if type(value) is int:
            return value
        raise wrong()
    if hint is float:
        # `lr: 1` is a fine float; True is not a number here.
        if type(value) in (int, float):
            return float(value)
        raise wrong()
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if hint is type(None):
        if value is None:
            return None
        raise wrong()
    raise ConfigError(f"{path}: config fields of type {_type_name(hint)} are not supported")


# -- value checks ---------------------------------------------------------------------------------


def validate(config: RunConfig) -> None:
    """Raise :class:`ConfigError` listing every invalid value (each named by its dotted field)."""
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    d, o, dist, ck, lg, tr = config.data, config.optim, config.distributed, config.checkpoint, config.log, config.train
    check(bool(config.run_dir), "run_dir must not be empty")

    check(bool(d.train_urls), "data.train_urls must not be empty")
    check(d.holdout_urls is None or bool(d.holdout_urls), "data.holdout_urls must be null or a non-empty pattern")
    check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    check(d.context_views_min >= 0, f"data.context_views_min must be >= 0, got {d.context_views_min}")
    check(d.context_views_min <= d.context_views_max,
          f"data.context_views_min ({d.context_views_min}) must be <= data.context_views_max ({d.context_views_max})")
    # The model noises and renders the first target view, so training needs at least one.
    check(d.target_views >= 1, f"data.target_views must be >= 1, got {d.target_views}")
    check(d.resolution is None or d.resolution >= 1, f"data.resolution must be null or >= 1, got {d.resolution}")
    check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    check(d.storage_retry_seconds > 0, f"data.storage_retry_seconds must be > 0, got {d.storage_retry_seconds}")
    check(d.shuffle_block_objects >= 1, f"data.shuffle_block_objects must be >= 1, got {d.shuffle_block_objects}")

    problems.extend(_model_problems(config.model))

    check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")
    check(o.lr_warmup_steps >= 0, f"optim.lr_warmup_steps must be >= 0, got {o.lr_warmup_steps}")
    check(0 <= o.lr_min_ratio <= 1, f"optim.lr_min_ratio must be in [0, 1], got {o.lr_min_ratio}")
    check(0 <= o.ema_decay < 1, f"optim.ema_decay must be in [0, 1) (0 disables EMA), got {o.ema_decay}")

    check(dist.zero_stage in (0, 1, 2, 3), f"distributed.zero_stage must be 0, 1, 2 or 3, got {dist.zero_stage}")
    check(dist.precision in typing.get_args(Precision),
          f"distributed.precision must be fp32, bf16 or fp16, got {dist.precision!r}")
    check(dist.gradient_accumulation_steps >= 1,
          f"distributed.gradient_accumulation_steps must be >= 1, got {dist.gradient_accumulation_steps}")
    check(dist.backend is None or dist.backend in BACKENDS,
          f"distributed.backend must be null (automatic) or one of {', '.join(BACKENDS)}, got {dist.backend!r}")

    check(ck.every_steps >= 1, f"checkpoint.every_steps must be >= 1, got {ck.every_steps}")
    check(ck.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {ck.keep_last}")
    check(ck.dir is None or bool(ck.dir), "checkpoint.dir must be null (<run_dir>/checkpoints) or a non-empty path")

    check(lg.every_steps >= 1, f"log.every_steps must be >= 1, got {lg.every_steps}")
    check(lg.preview_every_steps >= 0, f"log.preview_every_steps must be >= 0 (0 disables previews), got {lg.preview_every_steps}")
    check(lg.turntable_frames >= 1, f"log.turntable_frames must be >= 1, got {lg.turntable_frames}")

    check(tr.max_steps >= 1, f"train.max_steps must be >= 1, got {tr.max_steps}")
    check(tr.seed >= 0, f"train.seed must be >= 0, got {tr.seed}")
    check(tr.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {tr.max_nonfinite_steps}")
    check(tr.device in typing.get_args(Device), f"train.device must be auto, cpu or cuda, got {tr.device!r}")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_runnable(config: RunConfig, cuda_available: bool | None = None) -> None:
    """Refuse, naming the field, what this machine cannot run: called where the trainer starts
    (trainer.trainer.Trainer, launch/local.py), before any process group or engine exists.

    Not part of :func:`validate`: a config written on a GPU cluster must still load on a laptop
    (export, evaluation); it just cannot train there.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    problems = []
    device, precision = config.train.device, config.distributed.precision
    if device == "cuda" and not cuda_available:
        problems.append("train.device=cuda but CUDA is not available on this machine (use train.device=auto or cpu)")
    on_cpu = device == "cpu" or (device == "auto" and not cuda_available)
    if precision == "fp16" and on_cpu:
        problems.append("distributed.precision=fp16 needs a GPU (this run would train on the CPU): "
                        "use distributed.precision=bf16 or fp32")
    if config.distributed.backend == "nccl" and on_cpu:
        problems.append("distributed.backend=nccl needs CUDA devices (this run would train on the CPU): use gloo or null")
    if problems:
        raise ConfigError("this machine cannot run the config:\n  " + "\n  ".join(problems))


def _model_problems(model: ModelConfig) -> list[str]:
    problems = []
    try:
        # Re-run ModelConfig.__post_init__: the config may have been edited after construction.
        dataclasses.replace(model)
    except ValueError as error:
        problems.append(str(error).replace("ModelConfig.", "model."))
    try:
        get_preset(model.preset)  # otherwise an unknown preset only fails when the model is built
    except ValueError as error:
        problems.append(f"model.preset: {error}")
    if model.representation not in REPRESENTATIONS:
        problems.append(f"model.representation must be one of {', '.join(REPRESENTATIONS)}, got {model.representation!r}")
    for name in ("encode_resolution", "num_timesteps", "rays_per_view", "samples_per_ray", "mlp_hidden"):
        value = getattr(model, name)
        if value is not None and value < 1:
            problems.append(f"model.{name} must be >= 1, got {value}")
    if model.box_half_size <= 0:
        problems.append(f"model.box_half_size must be > 0, got {model.box_half_size}")
    return problems


# -- loading, overrides ---------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); learning rates are written like that."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value: `true`, `1e-3`, `[1, 2]`, `null`, or a plain string."""
    return yaml.load(text, Loader=_Loader)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``section.field=value`` in the plain dict ``raw`` (checking the path against the schema)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"malformed override {override!r}: expected dotted.key=value, e.g. train.max_steps=100")
    parts = key.split(".")
    cls: Any = RunConfig
    node = raw
    for depth, name in enumerate(parts):
        path = ".".join(parts[:depth])
        if cls is not None:  # inside a free-form dict (data.storage_options) any key goes
            hints = _hints(cls)
            if name not in hints:
                raise ConfigError(f"{_unknown(path, name, hints)} in override {override!r}")
            hint = hints[name]
            cls = hint if dataclasses.is_dataclass(hint) else None
            if cls is None and depth < len(parts) - 1 and not _is_mapping_type(hint):
                raise ConfigError(f"{_join(path, name)} is not a section, in override {override!r}")
        if depth == len(parts) - 1:
            node[name] = parse_value(text)
        else:
            child = node.setdefault(name, {})
            if child is None:  # `storage_options: null` in a file, then a key set on the command line
                child = node[name] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{_join(path, name)} is not a mapping, in override {override!r}")
            node = child


def _is_mapping_type(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def load_config(path: str | None, overrides: list[str] | None = None, storage_options: dict | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (local or any fsspec URL), then ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        with storage.open_url(path, "r", storage_options) as f:
            loaded = yaml.load(f, Loader=_Loader)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections, got {type(loaded).__name__}")
        raw = _drop_redacted(loaded or {}, "", warn=True)
    for override in overrides or []:
        apply_override(raw, override)
    return RunConfig.from_dict(raw)


def _drop_redacted(raw: Any, path: str, warn: bool) -> Any:
    # A saved config has its secrets replaced by '***'. Passing '***' on as a credential would
    # fail later with a baffling "access denied"; without the key the environment (AWS_*) is used.
    if not isinstance(raw, dict):
        return raw
    kept = {}
    for key, value in raw.items():
        if value == REDACTED:
            if warn:
                    log.warning("config field %s was redacted when saved; it is left out (set it from the environment)",
                            _join(path, str(key)))
            continue
        kept[key] = _drop_redacted(value, _join(path, str(key)), warn)
    return kept


# -- saving, identity -----------------------------------------------------------------------------


def to_dict(config: RunConfig, redact_secrets: bool = True) -> dict[str, Any]:
    """Plain JSON/YAML-able data (tuples become lists); secret-looking values become '***'."""
    raw = _plain(dataclasses.asdict(config))
    # Redact the whole tree, not just data.storage_options: credentials pasted anywhere else
    # (a future section, a nested options dict) must not reach a file either.
    return storage.redact(raw) if redact_secrets else raw


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(config: RunConfig, path_or_url: str, storage_options: dict | None = None) -> None:
    """Write the config as YAML (local path or fsspec URL), secrets redacted."""
    text = (f"# GOEmbedFusion run config (config_hash {config_hash(config)}); secrets are redacted\n"
            + yaml.safe_dump(to_dict(config), sort_keys=False))
    with storage.open_url(path_or_url, "w", storage_options) as f:
        f.write(text)


def config_hash(config: RunConfig) -> str:
    """12 hex digits identifying the run's settings (credentials do not count: they are left out)."""
    # Left out, not just masked: a config reloaded from its saved copy (secrets dropped, see
    # load_config) or given fresh credentials is still the same run.
    settings = _drop_redacted(to_dict(config), "", warn=False)
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_override",
    "check_runnable",
    "config_hash",
    "load_config",
    "parse_value",
    "save_config",
    "to_dict",
    "validate",
]
