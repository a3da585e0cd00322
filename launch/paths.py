"""Paths mean what the user typed: every relative path of a run config, resolved once against the
directory the launcher was started from, before any process that may run elsewhere sees it.

    config_file, overrides, config = load_resolved(args.config, overrides)   # every path absolute
    print(describe(config))                       # the paths actually used
"""

from __future__ import annotations

import json
import os

from data_pipeline import storage

# Every config field that names a file or directory (URLs with a scheme are left alone).
PATH_FIELDS = ("run_dir", "data.train_urls", "data.holdout_urls", "checkpoint.dir", "model.lpips_weights_path")


def absolute(value: str, cwd: str | None = None) -> str:
    """``value`` made absolute against ``cwd`` (default: the current directory) if it is a relative local path."""
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(cwd or os.getcwd(), value))


def field_value(config, field: str):
    node = config
    for part in field.split("."):
        node = getattr(node, part)
    return node


def resolved_overrides(config, cwd: str | None = None) -> list[str]:
    """``field=value`` overrides that replace each relative path of ``config`` by its absolute form."""
    out = []
    for field in PATH_FIELDS:
        value = field_value(config, field)
        if isinstance(value, str) and value and storage.is_local(value) and absolute(value, cwd) != value:
            out.append(f"{field}={json.dumps(absolute(value, cwd))}")  # JSON strings are YAML strings: no surprises
    return out


def describe(config) -> str:
    """One ``field: value`` line per path the run will use."""
    return "\n".join(f"{field}: {field_value(config, field)}" for field in PATH_FIELDS
                     if field_value(config, field) not in (None, ""))


def load_resolved(config_file: str | None, overrides: list[str]):
    """Load the run config with every relative path resolved against this directory.

    Returns ``(config_file, overrides, config)``: the config file's absolute path, the overrides
    followed by ``resolved_overrides`` (what to pass to processes that may run elsewhere), and the
    config they give. It loads twice: the first load (which refuses a bad config) names the paths,
    the second checks the config with them replaced."""
    from trainer.config import load_config

    config_file = absolute(config_file) if config_file else None
    config = load_config(config_file, overrides)
    overrides = list(overrides) + resolved_overrides(config)
    return config_file, overrides, load_config(config_file, overrides)
