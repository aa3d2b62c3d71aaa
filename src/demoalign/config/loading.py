"""Configs from a YAML file and `key=value` arguments, and back to a mapping."""

from __future__ import annotations

import difflib
import sys
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import yaml

from .options import OPTION_TYPES

# Names other trainers (transformers' TrainingArguments, TRL, the paper's scripts) give options
# demoalign spells otherwise: spelling is no guide to these.
OTHER_TOOLS_NAMES = {
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "max_grad_norm_clip": "max_grad_norm",
    "model_name_or_path": "model",
    "dataset": "data",
    "dataset_name": "data",
    "max_seq_length": "max_length",
    "T": "stages",
}


def _nearest(key: str, valid: list[str]) -> str:
    if OTHER_TOOLS_NAMES.get(key) in valid:
        return f"; did you mean `{OTHER_TOOLS_NAMES[key]}`?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value, f):
    """YAML gives typed values; `key=value` strings are parsed as YAML scalars, then checked."""
    target = f.type if isinstance(f.type, type) else OPTION_TYPES[f.type]
    if f.name == "columns" and isinstance(value, dict):  # a YAML mapping of prompt/response columns
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, str) and target in (int, float):
        try:
            value = target(value)
        except ValueError:
            raise ValueError(
                f"config key `{f.name}` expects {target.__name__}, got {value!r}"
            ) from None
    elif isinstance(value, str) and target is bool:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"config key `{f.name}` expects bool, got {value!r}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if target is str and value is not None and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ValueError(f"config key `{f.name}` expects {target.__name__}, got {value!r}")
    return value


def _renamed_keys(cls, values: dict) -> dict:
    """The command's old key spellings under their new names, each with one line on stderr."""
    values = dict(values)
    for old, new in getattr(cls, "renamed", {}).items():
        if old not in values:
            continue
        if new in values:
            raise ValueError(
                f"`{old}` and `{new}` both given for {cls.method}: `{old}` is the old name of "
                f"`{new}`; keep only `{new}`"
            )
        print(
            f"demoalign {cls.method}: config key `{old}` is deprecated; use `{new}` (same meaning)",
            file=sys.stderr,
        )
        values[new] = values.pop(old)
    return values


def build_config(cls, values: dict):
    """A validated config from a mapping; unknown keys name the nearest valid one."""
    values = _renamed_keys(cls, values)
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in by_name:
            raise ValueError(
                f"unknown config key `{key}` for {cls.method}{_nearest(key, list(by_name))}"
            )
        kwargs[key] = _coerce(value, by_name[key])
    config = cls(**kwargs)
    config.validate()
    return config


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_config(cls, config_file: str | None, overrides: list[str]):
    values = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{config_file}: invalid YAML ({_one_line(exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_file}: cannot read the config file ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of config keys")
        loaded.pop("method", None)
        values.update(loaded)
    values.update(parse_overrides(overrides))
    return build_config(cls, values)


def config_to_dict(config) -> dict:
    return {"method": config.method, **asdict(config)}


def option_docs(cls) -> list[tuple[str, str, str]]:
    """(key, default, help) for every option of a config class."""
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else ""
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows
