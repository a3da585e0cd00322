"""One typed configuration for a whole training run.

    config = load_config("configs/tiny_cpu.yaml", ["train.max_steps=7", "optim.lr=1e-3"])
    save_config(config, "runs/tiny/config.yaml")      # secrets redacted; s3:// works too
    config_hash(config)                                # short id of the run's settings
    print(config_help())                               # every field: default, constraint, meaning

A run is described by nested pydantic dataclasses (data, model, optim, distributed, checkpoint,
log, train), each field declared once with its type, constraint, default and description. The
``model`` section *is* ``model_zoo.goembedfusion.ModelConfig`` (what checkpoints store in
model_config.json) and ``data`` inherits the reader's settings from
``data_pipeline.reader.ReaderSettings``, so neither is copied here. pydantic does the checking, in
strict mode (True is not 1, "4" is not 4, an unknown key is an error); this module turns its
errors into one line per problem naming the dotted field (``optim.lr must be > 0, got -1.0``),
with "did you mean" for a misspelt key, and reads YAML and ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
import textwrap
import types
import typing
from typing import Annotated, Any, Literal

import pydantic
import pydantic.dataclasses
import yaml
from pydantic import AfterValidator, BeforeValidator, Field

from data_pipeline import storage
from data_pipeline.reader import ReaderConfig, ReaderSettings, Resolution, TargetViews
from model_zoo.goembedfusion import ModelConfig

log = logging.getLogger("trainer.config")

REDACTED = "***"  # what data_pipeline.storage.redact puts in place of a secret

# Strict (True is not 1, "4" is not 4; an int is a fine float) and closed (unknown keys refused).
section = pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(strict=True, extra="forbid"))


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the dotted field (``optim.lr``)."""


def _list_as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # YAML has no tuples: a list stands for one


Beta = Annotated[float, Field(ge=0, lt=1)]


def _zero_stage(stage: int) -> int:
    # Not Literal[0, 1, 2, 3]: pydantic lets True through for 1 there.
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"must be 0, 1, 2 or 3, got {stage}")
    return stage


# -- the sections -------------------------------------------------------------------------------


@section
class DataConfig(ReaderSettings):
    """The training data: the shards, and the reader settings (data_pipeline.reader.ReaderSettings)
    that the training reader and the held-out reader share."""

    # The reader's declarations, with the defaults of the embedded run; training needs a target view.
    target_views: Annotated[TargetViews, Field(ge=1)] = 2
    resolution: Resolution = 64
    train_urls: str = Field("data/synthetic/train-*.tar", min_length=1, description=(
        "training shards: brace pattern / glob, local or any fsspec URL (s3://bucket/train-{000000..000099}.tar)"))
    holdout_urls: str | None = Field("data/synthetic/holdout-*.tar", min_length=1, description=(
        "held-out shards, evaluated in order; null: no held-out evaluation"))
    storage_retry_seconds: float = Field(300.0, gt=0, description="an object-storage outage longer than this ends the run")

    def reader_config(self, seed: int, holdout: bool = False) -> ReaderConfig:
        """The streaming reader's settings: training shards (shuffled), or the held-out ones in order."""
        if holdout and self.holdout_urls is None:
            raise ConfigError("data.holdout_urls is null, so there is no held-out reader")
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(ReaderSettings)}
        # The reader treats None as "use the environment (AWS_* variables)"; so does {} here.
        settings["storage_options"] = dict(self.storage_options or {}) or None
        # Evaluation must see every held-out object, in the same order in every run.
        return ReaderConfig(self.holdout_urls if holdout else self.train_urls, seed=seed,
                            shuffle=not holdout, drop_last=not holdout, **settings)


@section
class OptimConfig:
    """AdamW with a linear warm-up and a cosine decay."""

    lr: float = Field(2e-3, gt=0, description=(
        "peak learning rate, reached after the warm-up (the tiny embedded run; DFM used 2e-5 at scale)"))
    betas: Annotated[tuple[Beta, Beta], BeforeValidator(_list_as_tuple)] = Field(
        (0.9, 0.99), description="Adam's (beta1, beta2), each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW)")
    eps: float = Field(1e-8, gt=0, description="Adam's epsilon")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    lr_warmup_steps: int = Field(100, ge=0, description="linear warm-up from 0, in optimizer steps")
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * lr_min_ratio at train.max_steps")
    ema_decay: float = Field(0.99, ge=0, lt=1, description=(
        "decay of the EMA copy of the weights; 0 disables it (0.99: ~100 steps; the default run is 1000 steps)"))


@section
class DistributedConfig:
    """DeepSpeed and the process group."""

    zero_stage: Annotated[int, AfterValidator(_zero_stage)] = Field(2, description="DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "bf16: matmuls and convolutions in bf16 under autocast, fp32 master weights; the renderer's compositing and "
        "GOEmbed's normalisation stay fp32 (README, Precision); fp16 needs a GPU"))
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    activation_checkpointing: bool = Field(False, description="recompute the U-Net's activations in backward (memory for compute)")
    # torch.distributed's built-in backends: a typo ("ncll") fails here, not at rendezvous.
    backend: Literal["nccl", "gloo", "mpi", "ucc"] | None = Field(None, description="null: nccl on CUDA, gloo otherwise")


@section
class CheckpointConfig:
    """Checkpoints (DeepSpeed state plus portable weights)."""

    every_steps: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_last: int = Field(3, ge=1, description="checkpoints kept; older ones are deleted")
    dir: str | None = Field(None, min_length=1, description="null: <run_dir>/checkpoints; any fsspec URL (s3://...) works")
    resume: bool = Field(True, description="resume automatically from the `latest` checkpoint in dir")


@section
class LogConfig:
    """Metrics, TensorBoard and previews."""

    every_steps: int = Field(10, ge=1, description="optimizer steps between scalar metrics")
    preview_every_steps: int = Field(200, ge=0, description="optimizer steps between rendered previews; 0 disables them")
    tensorboard: bool = Field(True, description="also write TensorBoard event files")
    turntable_frames: int = Field(24, ge=1, description="frames of the turntable preview")


@section
class TrainConfig:
    """The loop."""

    max_steps: int = Field(1000, ge=1, description=(
        "optimizer steps (each of distributed.gradient_accumulation_steps micro-batches)"))
    seed: int = Field(0, ge=0, description="seeds the model, the noise and the data order")
    max_nonfinite_steps: int = Field(5, ge=1, description="stop after this many non-finite losses in a row")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu")


@section
class RunConfig:
    """A whole training run."""

    run_dir: str = Field("runs/tiny", min_length=1, description=(
        "local path or fsspec URL; checkpoints, logs and the saved config go here"))
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """A validated config from plain (YAML-like) data; missing keys keep their defaults."""
        problems: list[str] = []
        config = _build(cls, raw, "", problems)
        if problems:
            raise ConfigError(_summary(problems))
        return config


def validate(config: RunConfig) -> None:
    """Raise :class:`ConfigError` listing every invalid value (each named by its dotted field).

    Construction validates already; this re-checks a config edited afterwards (attribute
    assignment is not validated, so that several fields can be changed together).
    """
    RunConfig.from_dict(dataclasses.asdict(config))


# -- from plain data to sections: pydantic checks, errors named by the dotted field ---------------


def _fields(cls: type) -> dict[str, Any]:
    return cls.__pydantic_fields__  # name -> pydantic FieldInfo (annotation, default, description)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _join(path: str, name: Any) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else str(name)


def _unknown(path: str, name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
    return f"unknown config field '{_join(path, name)}'{hint}"


def _summary(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"invalid config ({len(problems)} problems):\n  " + "\n  ".join(problems)


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """``cls`` from the mapping ``raw``, sections built first (strict pydantic dataclasses accept
    only instances for their nested sections); every problem is appended to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{path or 'config'} must be a mapping of fields, got {raw!r}")
        return None
    fields = _fields(cls)
    values, broken = {}, False
    for name, value in raw.items():
        info = fields.get(name)
        if info is not None and _is_section(info.annotation):
            value = _build(info.annotation, value, _join(path, name), problems)
            if value is None:
                broken = True  # reported; the other fields of this section are still checked
                continue
        values[name] = value
    try:
        built = cls(**values)
    except pydantic.ValidationError as error:
        problems.extend(_messages(error, cls, path))
        return None
    return None if broken else built


_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
           "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}


def _messages(error: pydantic.ValidationError, cls: type, path: str) -> list[str]:
    """One line per problem of ``error`` (raised by ``cls(...)`` at ``path``), named by its dotted field."""
    messages: list[str] = []
    for e in error.errors(include_url=False):
        loc, kind, value, ctx = e["loc"], e["type"], e.get("input"), e.get("ctx") or {}
        annotation = _fields(cls)[loc[0]].annotation if loc and loc[0] in _fields(cls) else None
        if _is_union(annotation) and len(loc) > 1 and isinstance(loc[1], str):
            loc = loc[:1]  # pydantic tags each arm of `str | list[str]`: one message for the field
        where = path
        for part in loc:
            where = _join(where, part)
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            text = _unknown(path, str(loc[-1]), _fields(cls))
        elif kind == "missing" and isinstance(loc[-1], int):  # a tuple with too few items
            text = f"{where[:where.rindex('[')]} must have {len(typing.get_args(annotation))} items ({_type_name(annotation)})"
        elif kind == "missing":
            text = f"{where} is required"
        elif kind == "literal_error":
            allowed = ("null or " if type(None) in typing.get_args(annotation) else "") + ctx["expected"]
            text = f"{where} must be {allowed}, got {value!r}"
        elif kind in _BOUNDS:
            sign, key = _BOUNDS[kind]
            text = f"{where} must be {sign} {ctx[key]}, got {value!r}"
        elif kind == "string_too_short":
            text = f"{where} must not be empty" + (" (null instead?)" if type(None) in typing.get_args(annotation) else "")
        elif kind in ("too_short", "too_long"):
            text = f"{where} must have {len(typing.get_args(annotation))} items ({_type_name(annotation)}), got {value!r}"
        elif kind == "value_error":  # raised by a validator: a field's, or a whole section's (loc ())
            text = str(ctx.get("error", e["msg"]))
            if loc:
                text = f"{where} {text}" if text.startswith("must") else f"{where}: {text}"
            elif path:  # "context_views_min (4) must be <= ..." -> "data.context_views_min (4) ..."
                text = re.sub(r"\b(" + "|".join(map(re.escape, _fields(cls))) + r")\b", lambda m: _join(path, m[1]), text)
        else:  # a value of the wrong type
            expected = _type_name(_element(annotation, loc[1:])) if annotation is not None else e["msg"].lower()
            text = f"{where} must be {expected}, got {value!r} ({type(value).__name__})"
        if text not in messages:
            messages.append(text)
    return messages


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _element(annotation: Any, loc: tuple) -> Any:
    """The annotation of ``loc`` inside a field annotated ``annotation`` (e.g. a tuple's item)."""
    for part in loc:
        if isinstance(part, int) and typing.get_origin(annotation) is tuple:
            annotation = typing.get_args(annotation)[part]
    return annotation


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is type(None):
        return "None"  # null in YAML
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    if typing.get_origin(annotation) is tuple:
        return f"tuple[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if _is_union(annotation):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return str(annotation).replace("typing.", "")


def check_runnable(config: RunConfig, cuda_available: bool | None = None) -> None:
    """Refuse, naming the field, what this machine cannot run: called where the trainer starts
    (trainer.trainer.Trainer, launch/local.py), before any process group or engine exists.

    Not part of validation: a config written on a GPU cluster must still load on a laptop
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


def _is_mapping_type(annotation: Any) -> bool:
    arms = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return any(arm is dict or typing.get_origin(arm) is dict for arm in arms)


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
            fields = _fields(cls)
            if name not in fields:
                raise ConfigError(f"{_unknown(path, name, fields)} in override {override!r}")
            annotation = fields[name].annotation
            cls = annotation if _is_section(annotation) else None
            if cls is None and depth < len(parts) - 1 and not _is_mapping_type(annotation):
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


# -- documentation: generated from the declarations ------------------------------------------------


def _constraint(info: Any) -> str:
    """``fp32 | bf16 | fp16`` for a choice, else the type and its bounds: ``int, >= 1``."""
    annotation = info.annotation
    arms = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if any(typing.get_origin(arm) is Literal for arm in arms):
        return " | ".join(str(choice) for arm in arms
                          for choice in (typing.get_args(arm) if typing.get_origin(arm) is Literal else ("null",)))
    bounds = {sign: f"{sign} {getattr(m, key)}" for m in info.metadata  # the last bound of a kind wins
              for sign, key in _BOUNDS.values() if getattr(m, key, None) is not None}
    return ", ".join([_type_name(annotation), *bounds.values()])


def config_help(width: int = 100) -> str:
    """Every config field with its type, constraint, default and meaning, generated from the
    declarations above (what ``--help`` of the trainer and the launchers shows)."""
    lines = ["config fields (set them in the --config YAML file or as dotted key=value overrides;",
             "`name = default  [type, constraint]`, then what it means):"]

    def describe(cls: type, path: str) -> None:
        for name, info in _fields(cls).items():
            dotted = _join(path, name)
            if _is_section(info.annotation):
                doc = " ".join((info.annotation.__doc__ or "").strip().split("\n\n")[0].split())
                lines.append("")
                lines.extend(textwrap.wrap(f"{dotted}: {doc}", width, subsequent_indent="  "))
                describe(info.annotation, dotted)
                continue
            default = info.get_default(call_default_factory=True)
            lines.append(f"  {dotted} = {json.dumps(_plain(default))}  [{_constraint(info)}]")
            if info.description:
                lines.extend(textwrap.wrap(info.description, width, initial_indent=" " * 6, subsequent_indent=" " * 6))

    describe(RunConfig, "")
    return "\n".join(lines)


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
    "config_help",
    "load_config",
    "parse_value",
    "save_config",
    "to_dict",
    "validate",
]
