"""Dataclass configs from YAML plus command-line overrides, validated with one clear error line.

Any recipe (SFT here; reward/DPO/GRPO/PPO reuse it) declares a dataclass; :func:`parse_cli` turns
``[CONFIG.yaml] [--set key=value ...] [--key value] [--key=value]`` into an instance. Nested
dict fields take dotted keys (``--set lora.r=8``). Values from the command line are parsed as
YAML scalars (``--lr 1e-4``, ``--packing true``, ``--set lora.target_modules=[q_proj,v_proj]``)
and then checked against the field's type annotation. Every problem raises :class:`ConfigError`
whose message names the key; the CLI prints it on one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, missing file. The message is one line."""


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float, str paths are left as
    is); raise ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 and 5e6 as strings
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {_describe(tp)}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {where}key {key!r}{hint}")


def from_dict(cls: type[T], values: dict[str, Any], check_paths: bool = True) -> T:
    """Build ``cls`` from ``values`` with type checks; fields whose metadata has ``path=True`` must
    name an existing file or directory."""
    if not isinstance(values, dict):
        raise ConfigError(f"a {cls.__name__} config must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, sorted(fields), "")
        value = coerce(value, hints[key], key)
        if check_paths and fields[key].metadata.get("path") and isinstance(value, str) and not Path(value).exists():
            raise ConfigError(f"{key}: file or directory {value!r} does not exist")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    head, _, rest = dotted.partition(".")
    if not rest:
        values[head] = value
        return
    sub = values.setdefault(head, {})
    if not isinstance(sub, dict):
        raise ConfigError(f"{head}: cannot set {dotted!r}, {head} is not a mapping")
    _set_dotted(sub, rest, value)


def _scalar(text: str) -> Any:
    """A command-line value as YAML reads it (numbers, true/false, null, [lists], {maps})."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (ConfigError when missing or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``argv`` into an optional YAML path and a dict of (dotted) overrides."""
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--set":
            if i + 1 >= len(argv) or "=" not in argv[i + 1]:
                raise ConfigError("--set needs key=value")
            key, _, text = argv[i + 1].partition("=")
            _set_dotted(overrides, key.strip(), _scalar(text))
            i += 2
        elif arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, _, text = body.partition("=")
                i += 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, text = body, argv[i + 1]
                i += 2
            else:
                key, text = body, "true"  # a bare flag means true
                i += 1
            _set_dotted(overrides, key.replace("-", "_"), _scalar(text))
        elif config_path is None:
            config_path = arg
            i += 1
        else:
            raise ConfigError(f"unexpected argument {arg!r} (only one config file may be given)")
    return config_path, overrides


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_cli(cls: type[T], argv: list[str], defaults: dict[str, Any] | None = None) -> T:
    """``[CONFIG.yaml] [overrides]`` -> a validated ``cls`` instance (ConfigError on any problem)."""
    config_path, overrides = parse_overrides(argv)
    values = merge(defaults or {}, load_yaml(config_path) if config_path else {})
    return from_dict(cls, merge(values, overrides))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-safe) dict of a config dataclass."""
    return dataclasses.asdict(config)
