"""Shared plumbing for the ``fastpeft`` subcommands: help text from a config dataclass, one-line
errors with exit status 2 for bad configurations, and table formatting."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpeft.training.config_io import ConfigError

EXIT_BAD_CONFIG = 2


def config_help(cls: type, prog: str, summary: str, positional: str | None = None) -> str:
    """Usage text listing every field of ``cls`` with its type and default (``positional``: how the
    bare arguments are shown, e.g. ``"PATH"``)."""
    hints = typing.get_type_hints(cls)
    bare = f" [{positional}]" if positional else ""
    lines = [
        f"usage: fastpeft {prog}{bare} [CONFIG.yaml] [--key value ...] [--set key=value ...]",
        "",
        summary,
        "",
        "keys (YAML or command line; nested keys with dots, e.g. --set lora.r=8):",
    ]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        tp = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(f"  {f.name:<24} {tp:<32} default: {default!r}")
    return "\n".join(lines)


def run_cli(prog: str, argv: list[str], body: Callable[[list[str]], int], help_text: Callable[[], str]) -> int:
    """Run ``body(argv)``; ``--help`` prints ``help_text()``. Configuration errors (ConfigError, and
    the ValueError/TypeError/OSError/ImportError that recipes raise for bad inputs and files) print
    one line on stderr and return 2; ``FASTPEFT_DEBUG=1`` re-raises them with the traceback."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        return int(body(argv) or 0)
    except (ConfigError, OSError, ValueError, TypeError, ImportError) as err:
        if os.environ.get("FASTPEFT_DEBUG") == "1":
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fastpeft {prog}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_CONFIG


def json_object(path: Path, key: str) -> dict[str, Any]:
    """The JSON object in ``path``; ConfigError naming ``key`` when it is not valid JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def print_kv(rows: list[tuple[str, Any]]) -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
