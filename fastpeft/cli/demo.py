"""``fastpeft demo`` (also plain ``fastpeft``): the embedded QLoRA SFT job, CPU-friendly, no downloads.
Options: ``--model DIR`` (a local HF model instead of pretraining one), ``--data FILE.jsonl``,
``--output_dir DIR``, and every other DemoConfig key."""

from __future__ import annotations

from fastpeft.cli.common import config_help, run_cli
from fastpeft.training.config_io import parse_cli


def _body(argv: list[str]) -> int:
    from fastpeft.demo.embedded_job import DemoConfig, run_demo

    run_demo(parse_cli(DemoConfig, argv))
    return 0


def main(argv: list[str]) -> int:
    from fastpeft.demo.embedded_job import DemoConfig

    return run_cli("demo", argv, _body, lambda: config_help(DemoConfig, "demo", __doc__.split("\n")[0]))
