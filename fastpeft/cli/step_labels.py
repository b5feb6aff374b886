"""``fastpeft step-labels [CONFIG.yaml] [--key value ...]``: Math-Shepherd step labels for a PRM.

Samples solutions of the ``input`` prompts (JSONL ``{"prompt", "answer"}``) with the policy
(``model`` + optional ``adapter``), labels every step prefix from ``rollouts`` policy completions
(soft = share reaching the answer, hard = any) and, with ``checker``, by a step checker; writes
``output`` chunk by chunk and resumes an interrupted run (:mod:`fastpeft.training.step_labels`).
The records train a process or outcome reward model: ``fastpeft reward --objective process``.
"""

from __future__ import annotations

import json

from fastpeft.cli.common import config_help, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

SUMMARY = "Label policy solutions step by step (Monte Carlo rollouts, optional checker) for a PRM; resumable."


def main(argv: list[str]) -> int:
    from fastpeft.training.step_labels import StepLabelConfig, build_step_labels

    def body(args: list[str]) -> int:
        config = parse_cli(StepLabelConfig, args)
        if config.model is None or config.input is None:
            raise ConfigError("step-labels needs model (a local model directory) and input (a JSONL file)")
        print(json.dumps(build_step_labels(config), indent=1))
        return 0

    return run_cli("step-labels", argv, body, lambda: config_help(StepLabelConfig, "step-labels", SUMMARY))
