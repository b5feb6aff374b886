"""``fastpeft merge --adapter DIR --output DIR [--model DIR]``: fold a PEFT-format adapter into its
base model and save a plain transformers model (safetensors) that loads without fastpeft.

The base defaults to the adapter's ``base_model_name_or_path`` when that is a local directory; a
tokenizer found in the base directory is copied along.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fastpeft.cli.common import config_help, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

_PATH = {"path": True}


@dataclasses.dataclass
class MergeConfig:
    adapter: str | None = dataclasses.field(default=None, metadata=_PATH)
    output: str | None = None
    model: str | None = dataclasses.field(default=None, metadata=_PATH)
    dtype: str = "float32"


def merge_adapter(config: MergeConfig) -> Path:
    """Load base + adapter, merge, unload, save to ``config.output``; returns the output path."""
    import fastpeft
    from fastpeft.training.model_setup import build_model

    if not config.adapter or not config.output:
        raise ConfigError("merge needs --adapter DIR and --output DIR")
    adapter_cfg = Path(config.adapter) / "adapter_config.json"
    if not adapter_cfg.is_file():
        raise ConfigError(f"adapter: {config.adapter!r} has no adapter_config.json")
    base = config.model or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(f"model: base model directory {base!r} not found; pass --model DIR")
    model = build_model(base, None, config.dtype)
    fastpeft.load_adapter(model, config.adapter)
    model = fastpeft.merge_and_unload(model)
    out = Path(config.output)
    model.save_pretrained(out, safe_serialization=True)
    if any((Path(base) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from fastpeft.training.tokenizer import load_tokenizer

        load_tokenizer(base).save_pretrained(out)
    return out


def _body(argv: list[str]) -> int:
    out = merge_adapter(parse_cli(MergeConfig, argv))
    print(f"merged model saved to {out}")
    return 0


def main(argv: list[str]) -> int:
    return run_cli("merge", argv, _body, lambda: config_help(MergeConfig, "merge", __doc__.split("\n\n")[0]))
