"""``fastpeft merge --adapter DIR --output DIR [--model DIR]``: fold a PEFT-format adapter into its
base model and save a plain transformers model (safetensors) that loads without fastpeft.

The base defaults to the adapter's ``base_model_name_or_path`` when that is a local directory; a
tokenizer found in the base directory is copied along.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastpeft.cli.common import config_help, json_object, run_cli
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
    from fastpeft.training.checkpoint import check_output_dir, save_pretrained
    from fastpeft.training.model_setup import build_model

    if not config.adapter or not config.output:
        raise ConfigError("merge needs --adapter DIR and --output DIR")
    adapter_cfg = Path(config.adapter) / "adapter_config.json"
    if not adapter_cfg.is_file():
        raise ConfigError(f"adapter: {config.adapter!r} has no adapter_config.json")
    saved_config = json_object(adapter_cfg, "adapter")  # checked before any model is loaded
    base = config.model or saved_config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(f"model: base model directory {base!r} not found; pass --model DIR")
    out = Path(config.output)
    try:  # before the model is loaded
        check_output_dir(out)
    except ValueError as err:
        raise ConfigError(str(err).replace("output_dir:", "output:", 1)) from err
    model = build_model(base, None, config.dtype)
    fastpeft.load_adapter(model, config.adapter)  # refuses NaN/inf weights
    model = fastpeft.merge_and_unload(model)
    tokenizer = None
    if any((Path(base) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from fastpeft.training.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(base)
    return save_pretrained(model, out, tokenizer)


def _body(argv: list[str]) -> int:
    out = merge_adapter(parse_cli(MergeConfig, argv))
    print(f"merged model saved to {out}")
    return 0


def main(argv: list[str]) -> int:
    return run_cli("merge", argv, _body, lambda: config_help(MergeConfig, "merge", __doc__.split("\n\n")[0]))
