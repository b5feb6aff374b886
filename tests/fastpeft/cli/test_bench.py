"""``fastpeft bench`` in the common argument style: positional scenarios, flags, aliases, errors."""

from __future__ import annotations

from fastpeft.cli import main
from fastpeft.cli.bench import _ALIASES, BenchConfig
from fastpeft.training.config_io import parse_cli


def test_flags_do_not_swallow_scenarios_and_aliases_map_old_flags():
    args = parse_cli(
        BenchConfig,
        ["--small", "decode-linear", "sampling", "--reps", "2", "--no-plots"],
        positional="scenarios",
        aliases=_ALIASES,
    )
    assert args.scenarios == ["decode-linear", "sampling"] and args.small is True and args.reps == 2 and args.no_plots
    args = parse_cli(BenchConfig, ["--full", "--list", "--filter", "M=1"], positional="scenarios", aliases=_ALIASES)
    assert args.small is False and args.list_scenarios and args.filter == "M=1" and args.scenarios == []


def test_list_and_errors(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("decode-linear") and "sampling" in out
    assert main(["bench", "--record-cpu", "--no-record"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["bench", "--ledger", "--ledger-recipes"]) == 2
    assert "two runs" in capsys.readouterr().err
    assert main(["bench", "--full=yes"]) == 2
    assert "--full takes no value" in capsys.readouterr().err
