"""adapterctl.options: dataclass fields -> click options -> dataclass (types, flags, envvars,
defaults in help, lists, choices, deferred defaults) and validation errors reaching the user."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from adapterctl.errors import InvalidArgument
from adapterctl.options import click_options, click_params, from_kwargs, option


@dataclass
class Demo:
    name: str = option("demo", "A name.", envvar="DEMO_NAME_VAR")
    count: int = option(3, "How many.")
    ratio: float = option(0.0, "A ratio.")
    limit: int | None = option(None, "Optional limit.")
    mode: str = option("fast", "Mode.", choices=("fast", "slow"))
    tags: list[str] = option(["a", "b"], "Tags.", cli_name="--tag-list")
    verbose: bool = option(False, "Talk more.")
    color: bool = option(True, "Colour output.")
    path_style: bool | None = option(None, "Tri-state.")
    config: Path | None = option(None, "A config file.", path="file")

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InvalidArgument(f"--count must be >= 1, got {self.count}")


def _run(args: list[str], env: dict[str, str] | None = None, **settings):
    seen = {}

    @click.command()
    @click_options(Demo, **settings)
    def cmd(**kwargs):
        seen["kwargs"] = kwargs
        seen["config"] = from_kwargs(Demo, kwargs)

    result = CliRunner().invoke(cmd, args, env=env)
    return result, seen


def test_defaults_and_types_round_trip(tmp_path):
    result, seen = _run([])
    assert result.exit_code == 0, result.output
    assert seen["config"] == Demo()
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("")
    result, seen = _run(
        [
            "--name",
            "x",
            "--count",
            "7",
            "--ratio",
            "0.5",
            "--limit",
            "9",
            "--mode",
            "slow",
            "--tag-list",
            " q, v,,o ",
            "--verbose",
            "--no-color",
            "--path-style",
            "--config",
            str(cfg_file),
        ]
    )
    assert result.exit_code == 0, result.output
    assert seen["config"] == Demo("x", 7, 0.5, 9, "slow", ["q", "v", "o"], True, False, True, cfg_file)


def test_bool_flag_shapes():
    opts = {p.name: p for p in click_params(Demo)}
    assert opts["verbose"].is_flag and not opts["verbose"].secondary_opts  # False default: plain --verbose
    assert opts["color"].secondary_opts == ["--no-color"]  # True default needs a way off
    assert opts["path_style"].secondary_opts == ["--no-path-style"]  # None = decide automatically
    deferred = {p.name: p for p in click_params(Demo, defer_defaults=True)}
    assert deferred["verbose"].secondary_opts == ["--no-verbose"] and deferred["verbose"].default is None


def test_envvars_field_and_prefix():
    result, seen = _run([], env={"DEMO_NAME_VAR": "from-env", "DEMO_COUNT": "5"}, envvar_prefix="DEMO_")
    assert result.exit_code == 0, result.output
    assert (seen["config"].name, seen["config"].count) == ("from-env", 5)
    result, seen = _run(["--count", "6"], env={"DEMO_COUNT": "5"}, envvar_prefix="DEMO_")
    assert seen["config"].count == 6  # a flag beats the environment
    result, seen = _run([], env={"DEMO_COUNT": "5"})  # no prefix: only declared envvars are read
    assert seen["config"].count == 3


def test_help_shows_defaults_envvars_and_list_metavar():
    help_text = " ".join(_run(["--help"])[0].output.split())  # undo click's wrapping
    assert "[default: 3]" in help_text and "[default: fast]" in help_text and "[default: a,b]" in help_text
    assert "[default: 0" not in help_text and "[default: None]" not in help_text  # zero / unset: not shown
    assert "env var: DEMO_NAME_VAR" in help_text and "--tag-list A,B,..." in help_text
    assert "--mode [fast|slow]" in help_text and "--config FILE" in help_text
    hidden = _run(["--help"], envvar_prefix="DEMO_", show_envvar=False)[0].output
    assert "env var" not in hidden


def test_bad_choice_and_missing_file_are_usage_errors(tmp_path):
    assert _run(["--mode", "medium"])[0].exit_code == 2
    assert _run(["--config", str(tmp_path / "nope")])[0].exit_code == 2
    assert _run(["--count", "many"])[0].exit_code == 2


def test_post_init_error_surfaces_unchanged():
    result, _ = _run(["--count", "0"])
    assert isinstance(result.exception, InvalidArgument) and "--count must be >= 1, got 0" in str(result.exception)


def test_post_init_error_is_one_line_from_the_cli(monkeypatch, capsys):
    from adapterctl.client.cli import main as main_module

    monkeypatch.setattr("sys.argv", ["adapterctl", "serve", "--port", "70000"])
    with pytest.raises(SystemExit) as exit_info:
        main_module.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: --port must be in [0, 65535], got 70000\n"


def test_from_kwargs_ignores_non_fields_and_defers_unset_values():
    cfg = from_kwargs(Demo, {"count": None, "limit": 4, "unrelated": 1}, lower={"count": 8, "name": "file"})
    assert (cfg.count, cfg.limit, cfg.name, cfg.mode) == (8, 4, "file", "fast")
    assert from_kwargs(Demo, {"count": 2}, lower={"count": 8}).count == 2  # higher precedence wins


def test_option_copies_mutable_defaults_and_checks_path_kind():
    a, b = Demo(), Demo()
    a.tags.append("z")
    assert b.tags == ["a", "b"]
    with pytest.raises(ValueError):
        option(None, "x", path="socket")
