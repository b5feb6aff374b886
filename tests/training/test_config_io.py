"""YAML + command-line configs: overrides, type checks, one-line errors."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from fastpeft.training.config_io import ConfigError, from_dict, parse_cli, parse_overrides


@dataclasses.dataclass
class Toy:
    name: str = "x"
    lr: float = 1e-3
    steps: int | None = None
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    items: list[int] = dataclasses.field(default_factory=list)
    sub: dict = dataclasses.field(default_factory=dict)
    data: str | list | None = dataclasses.field(default=None, metadata={"path": True})


def test_yaml_then_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: base\nlr: 1e-4\nsub: {r: 4, alpha: 8}\nitems: [1, 2]\n")
    out = parse_cli(Toy, [str(cfg), "--steps", "7", "--set", "sub.r=16", "--flag", "--mode=b", "--lr", "2e-5"])
    assert out == Toy(name="base", lr=2e-5, steps=7, flag=True, mode="b", items=[1, 2], sub={"r": 16, "alpha": 8})
    assert parse_cli(Toy, ["--steps", "5e3"]).steps == 5000  # YAML 1.1 reads 5e3 as a string
    assert parse_cli(Toy, ["--data", "[1, 2]"]).data == [1, 2]  # a list of records, not a path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--stpes", "3"], "unknown key 'stpes' (did you mean 'steps'?)"),
        (["--steps", "three"], "steps: expected int | None, got 'three'"),
        (["--steps", "1.5"], "steps: expected int | None, got 1.5"),
        (["--flag", "maybe"], "flag: expected true/false, got 'maybe'"),
        (["--mode", "c"], "mode: expected one of ['a', 'b'], got 'c'"),
        (["--items", "[1, x]"], "items[1]: expected an integer, got 'x'"),
        (["--data", "/no/such/file.jsonl"], "data: file or directory '/no/such/file.jsonl' does not exist"),
        (["missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["a.yaml", "b.yaml"], "only one config file"),
        (["--set", "novalue"], "--set needs key=value"),
    ],
)
def test_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_cli(Toy, argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_cli(Toy, [str(bad)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_cli(Toy, [str(broken)])


def test_post_init_errors_become_config_errors():
    @dataclasses.dataclass
    class Checked:
        n: int = 1

        def __post_init__(self):
            if self.n <= 0:
                raise ValueError(f"n must be positive, got {self.n}")

    with pytest.raises(ConfigError, match="n must be positive, got 0"):
        from_dict(Checked, {"n": 0})


def test_parse_overrides_bare_flag_and_dotted():
    path, values = parse_overrides(["cfg.yaml", "--a.b.c", "1", "--x"])
    assert path == "cfg.yaml" and values == {"a": {"b": {"c": 1}}, "x": True}


def test_strings_keep_what_was_typed_and_keys_may_not_repeat():
    assert parse_cli(Toy, ["--name", "; "]).name == "; "  # YAML alone would strip the space
    assert parse_cli(Toy, ["--name", "'007'"]).name == "007"  # YAML quoting still forces a string
    with pytest.raises(ConfigError, match="'steps' is given twice"):
        parse_cli(Toy, ["--steps", "1", "--set", "steps=2"])


def test_flags_positionals_and_aliases(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: from-yaml\n")
    out = parse_cli(Toy, ["--flag", str(cfg)])  # a flag does not take a config file as its value
    assert out.flag is True and out.name == "from-yaml"
    out = parse_cli(
        Toy,
        ["--flag", "1", "2", "--b-mode", "--n", "4"],
        positional="items",
        aliases={"b_mode": ("mode", "b"), "n": "steps"},
    )
    assert out == Toy(items=[1, 2], flag=True, mode="b", steps=4)
    assert parse_cli(Toy, ["only"], positional="name").name == "only"  # one word for a one-value field
    assert parse_cli(Toy, ["3"], positional="items").items == [3]
    assert parse_cli(Toy, ["--flag", "false", "x"], positional="name").flag is False
