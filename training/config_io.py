"""Dataclass configs from YAML plus command-line overrides, validated with one clear error line.

Any recipe (SFT here; reward/DPO/GRPO/PPO reuse it) declares a dataclass; :func:`parse_cli` turns
``[CONFIG.yaml] [--set key=value ...] [--key value] [--key=value]`` into an instance. Nested
dict fields take dotted keys (``--set lora.r=8``). Values from the command line are parsed as
YAML scalars (``--lr 1e-4``, ``--packing true``, ``--set lora.target_modules=[q_proj,v_proj]``)
and then checked against the field's type annotation. Every problem raises :class:`ConfigError`
whose message names the key; the CLI prints it on one line and exits with status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Collection, Mapping
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
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-4 and 5e6 as strings
            value = float(value)
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
    """A command-line value as YAML reads it (numbers, true/false, null, [lists], {maps}); text that
    YAML reads as a plain string is kept as typed (``--stop "; "`` keeps its space)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, str) and not text.lstrip().startswith(("'", '"')) else value


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}
_YAML_SUFFIXES = (".yaml", ".yml")


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


def parse_overrides(
    argv: list[str],
    flags: Collection[str] = (),
    positional: str | None = None,
    aliases: Mapping[str, str | tuple[str, Any]] | None = None,
) -> tuple[str | None, dict[str, Any]]:
    """Split ``argv`` into an optional YAML path and a dict of (dotted) overrides.

    ``--key value``, ``--key=value`` and ``--set key=value`` set a key (dashes in ``--key`` read as
    underscores); a key given twice is an error. A key in ``flags`` (booleans) does not take the
    next word as its value when that word is a config file or, with ``positional``, a bare word that
    is not true/false (``--small decode-linear``: a flag, then a positional argument). With
    ``positional``, bare words other than a ``.yaml``/``.yml`` file are collected as a list under
    that key (``fastpeft bench decode-linear sampling``). ``aliases`` maps a flag to another key
    (``"list": "list_scenarios"``) or to a key and a fixed value (``"full": ("small", False)``).
    """
    aliases = aliases or {}
    config_path, overrides, seen, words, i = None, {}, set(), [], 0

    def put(key: str, value: Any) -> None:
        if key in seen:
            raise ConfigError(f"{key!r} is given twice on the command line")
        seen.add(key)
        _set_dotted(overrides, key, value)

    while i < len(argv):
        arg = argv[i]
        if arg == "--set":
            if i + 1 >= len(argv) or "=" not in argv[i + 1]:
                raise ConfigError("--set needs key=value")
            key, _, text = argv[i + 1].partition("=")
            put(key.strip(), _scalar(text))
            i += 2
        elif arg.startswith("--"):
            body, has_value, text = arg[2:].partition("=")
            key = body.replace("-", "_")
            alias = aliases.get(key, aliases.get(body))
            if isinstance(alias, tuple):
                if has_value:
                    raise ConfigError(f"--{body} takes no value")
                put(*alias)
                i += 1
                continue
            key = alias or key
            i += 1
            if not has_value:
                following = argv[i] if i < len(argv) else None
                takes_next = following is not None and not following.startswith("--")
                if key in flags and takes_next and following.lower() not in _BOOL_WORDS:
                    takes_next = positional is None and not following.endswith(_YAML_SUFFIXES)
                text = following if takes_next else "true"  # a bare flag means true
                i += takes_next
            put(key, _scalar(text))
        elif positional is not None and not arg.endswith(_YAML_SUFFIXES):
            words.append(arg)
            i += 1
        elif config_path is None:
            config_path = arg
            i += 1
        else:
            raise ConfigError(f"unexpected argument {arg!r} (only one config file may be given)")
    if words:
        put(positional, words)
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


def _is_bool(tp: Any) -> bool:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return tp is bool or (union and set(typing.get_args(tp)) == {bool, type(None)})


def _takes_list(tp: Any) -> bool:
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(a in (list, tuple) or typing.get_origin(a) in (list, tuple) for a in arms)


def parse_cli(
    cls: type[T],
    argv: list[str],
    defaults: dict[str, Any] | None = None,
    positional: str | None = None,
    aliases: Mapping[str, str | tuple[str, Any]] | None = None,
) -> T:
    """``[CONFIG.yaml] [overrides]`` -> a validated ``cls`` instance (ConfigError on any problem).

    ``positional`` and ``aliases``: see :func:`parse_overrides`; ``cls``'s boolean fields are its flags.
    """
    hints = typing.get_type_hints(cls)
    flags = [name for name, tp in hints.items() if _is_bool(tp)]
    config_path, overrides = parse_overrides(argv, flags, positional, aliases)
    words = overrides.get(positional) if positional else None
    if words is not None and len(words) == 1 and not _takes_list(hints.get(positional)):
        overrides[positional] = words[0]  # `fastpeft info DIR`: one word for a one-value field
    values = merge(defaults or {}, load_yaml(config_path) if config_path else {})
    return from_dict(cls, merge(values, overrides))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-safe) dict of a config dataclass."""
    return dataclasses.asdict(config)
