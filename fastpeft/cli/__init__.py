"""The ``fastpeft`` command: ``fastpeft <subcommand> [args]`` (also ``python -m fastpeft``).

Each subcommand lives in its own module as ``main(argv: list[str]) -> int``; this table maps names
to ``"module:function"`` and is imported lazily so ``fastpeft --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("fastpeft.cli_bench:main", "benchmark scenarios side by side with baselines (table, JSON, plots)"),
    "search": ("fastpeft.reasoning.cli_search:main", "answer JSONL prompts with verifier-guided search under a compute budget"),
    "reward": ("fastpeft.training.cli_rl:main_reward", "train a reward model (scalar head, Bradley-Terry) on preference pairs"),
    "dpo": ("fastpeft.training.cli_rl:main_dpo", "DPO / IPO on preference pairs (reference = adapters disabled)"),
    "grpo": ("fastpeft.training.cli_rl:main_grpo", "GRPO with verifiable rewards on the batched sampler"),
    "ppo": ("fastpeft.training.cli_rl:main_ppo", "PPO with a value head and GAE on the same rollouts"),
    "demo": ("fastpeft.training.cli_demo:main", "the embedded job: pretrain a tiny Llama, then QLoRA SFT on CPU (default)"),
    "sft": ("fastpeft.training.cli_sft:main", "supervised fine-tuning (LoRA / QLoRA / full) from a YAML config"),
    "merge": ("fastpeft.training.cli_merge:main", "merge a PEFT-format adapter into its base model and save it"),
    "info": ("fastpeft.training.cli_info:main", "versions, device, kernel backend; or what an adapter/model/run dir holds"),
    "plan": ("fastpeft.training.cli_plan:main", "estimate memory of full FT / LoRA / QLoRA and recommend one"),
}
DEFAULT_COMMAND = "demo"


def _usage() -> str:
    lines = ["usage: fastpeft <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", f"With no command, runs `{DEFAULT_COMMAND}`. `fastpeft <command> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_COMMAND
    if name not in COMMANDS:
        print(f"fastpeft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(argv) or 0)
