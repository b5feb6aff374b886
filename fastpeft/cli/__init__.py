"""The ``fastpeft`` command: ``fastpeft <subcommand> [CONFIG.yaml] [--key value ...] [--set key=value ...]``
(also ``python -m fastpeft``).

One module per subcommand (``fastpeft.cli.<name>``, a dash in the name an underscore in the module,
each with ``main(argv: list[str]) -> int``), one argument style: every subcommand reads a config
dataclass from an optional YAML file plus command-line overrides
(:func:`fastpeft.training.config_io.parse_cli`), prints bad input on one line and exits with status 2 (:func:`fastpeft.cli.common.run_cli`). The CLI is the top of the stack:
it may import every package, but only lazily, so ``fastpeft --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# name -> one-line help; the command runs fastpeft.cli.<name>:main
COMMANDS: dict[str, str] = {
    "bench": "benchmark scenarios side by side with baselines (table, JSON, plots)",
    "search": "answer JSONL prompts with verifier-guided search under a compute budget",
    "reward": "train a reward model (scalar head, Bradley-Terry) on preference pairs",
    "step-labels": "label policy solutions step by step (Math-Shepherd rollouts) for a process reward model",
    "dpo": "DPO / IPO on preference pairs (reference = adapters disabled)",
    "grpo": "GRPO with verifiable rewards on the batched sampler",
    "ppo": "PPO with a value head and GAE on the same rollouts",
    "demo": "the embedded job: pretrain a tiny Llama, then QLoRA SFT on CPU (default)",
    "sft": "supervised fine-tuning (LoRA / QLoRA / full) from a YAML config",
    "merge": "merge a PEFT-format adapter into its base model and save it",
    "info": "versions, device, kernel backend; or what an adapter/model/run dir holds",
    "plan": "estimate memory of full FT / LoRA / QLoRA and recommend one",
}
DEFAULT_COMMAND = "demo"
_REPOSITORY = Path(__file__).resolve().parents[2]


def _usage() -> str:
    lines = ["usage: fastpeft <command> [CONFIG.yaml] [--key value ...] [--set key=value ...]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in sorted(COMMANDS.items())]
    lines += ["", f"With no command, runs `{DEFAULT_COMMAND}`. `fastpeft <command> --help` for its options."]
    return "\n".join(lines)


def unshadow_kernels() -> None:
    """Drop this source checkout's root from ``sys.path``.

    ``python -m fastpeft`` (or ``python -m fastpeft.demo.<script>``, see :mod:`fastpeft.demo`) run from
    the repository root puts the root on ``sys.path``; bitsandbytes
    then imports our ``kernels/`` folder as the top-level ``kernels`` package (Hugging Face's kernel
    hub, which it probes for optional CPU kernels). fastpeft itself never needs the root there: its
    packages are mapped by the installation (``fastpeft.kernels`` -> ``kernels/``).
    """
    if not (_REPOSITORY / "kernels" / "__init__.py").is_file():
        return  # an installed copy: no kernels/ folder beside the package
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _REPOSITORY]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    unshadow_kernels()
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_COMMAND
    if name not in COMMANDS:
        print(f"fastpeft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"{__name__}.{name.replace('-', '_')}").main(argv) or 0)
