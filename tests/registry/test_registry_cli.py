"""The registry commands end to end with click's CliRunner against a moto S3 server:
publish -> promote -> show -> pull -> rollback, and one-line errors."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from registry_testkit import make_adapter

from adapterctl.client.cli.registry_cmds import COMMANDS
from adapterctl.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def cli():
    group = click.Group("adapterctl", commands={c.name: c for c in COMMANDS})
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(group, [str(a) for a in args], catch_exceptions=True)
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    return run


def test_publish_promote_show_pull_rollback_on_s3(cli, s3_registry_uri, tmp_path):
    reg = ["--registry", s3_registry_uri]
    v1 = make_adapter(tmp_path / "v1", seed=1)
    v2 = make_adapter(tmp_path / "v2", seed=2)
    assert cli("publish", v1, "--name", "reviews", "--label", "team=nlp", *reg).output == "reviews:1\n"
    assert cli("publish", v2, "--name", "reviews", "--quiet", *reg).output == "reviews:2\n"
    assert cli("promote", "reviews:1", "prod", *reg).output == "reviews:prod -> reviews:1\n"
    assert cli("promote", "reviews:2", "prod", *reg).output == "reviews:prod -> reviews:2 (was 1)\n"

    shown = json.loads(cli("show", "reviews:prod", "--json", *reg).output)
    assert shown["version"] == 2 and shown["aliases"] == ["prod"] and shown["digest"].startswith("sha256:")
    human = cli("show", "reviews:1", *reg).output
    assert "ref:        reviews:1" in human and "labels:     team=nlp" in human and "rank 4, alpha 8" in human
    assert "adapter_model.safetensors" in human and "train_loss 1.5" in human

    out = tmp_path / "pulled"
    assert cli("pull", "reviews:prod", out, *reg).output.strip() == str(out)
    assert (out / "adapter_model.safetensors").read_bytes() == (v2 / "adapter_model.safetensors").read_bytes()

    assert cli("rollback", "reviews", "prod", *reg).output == "reviews:prod -> reviews:1\n"
    assert json.loads(cli("show", "reviews:prod", "--json", *reg).output)["version"] == 1

    listing = cli("list", "reviews", *reg).output.splitlines()
    assert listing[0].startswith("VERSION") and [line.split("\t")[0] for line in listing[1:]] == ["1", "2"]
    assert "\tprod\t" in listing[1]
    assert json.loads(cli("list", "--json", *reg).output) == [{"name": "reviews", "latest": 2}]
    assert [m["version"] for m in json.loads(cli("list", "reviews", "--json", *reg).output)] == [1, 2]


def test_registry_options_come_from_the_environment(cli, s3_registry_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERCTL_REGISTRY", s3_registry_uri)
    assert cli("publish", make_adapter(tmp_path / "a"), "--name", "env").output == "env:1\n"
    from adapterctl.registry import open_registry

    assert open_registry(s3_registry_uri).resolve("env").version == 1


def test_delete_and_gc(cli, tmp_path):
    reg = ["--registry", tmp_path / "reg"]
    cli("publish", make_adapter(tmp_path / "a", seed=1), "--name", "x", *reg)
    cli("publish", make_adapter(tmp_path / "b", seed=2), "--name", "x", *reg)
    cli("promote", "x:2", "prod", *reg)
    refused = cli("delete", "x:2", *reg, ok=False)
    assert isinstance(refused.exception, FailedPrecondition)
    assert cli("delete", "x:1", *reg).output == "deleted x:1\n"
    dry = cli("gc", "--grace", "0", "--dry-run", *reg).output
    assert dry.startswith("would delete 1 blobs")
    assert cli("gc", "--grace", "0", *reg).output.startswith("deleted 1 blobs")
    assert cli("gc", "--grace", "0", *reg).output.startswith("deleted 0 blobs")


@pytest.mark.parametrize("args, error", [
    (["show", "nope"], NotFound),
    (["show", "bad/name"], InvalidArgument),
    (["promote", "x", "prod"], InvalidArgument),
    (["rollback", "x", "prod"], NotFound),
])
def test_errors_are_domain_errors(cli, tmp_path, args, error):
    result = cli(*args, "--registry", tmp_path / "reg", ok=False)
    assert isinstance(result.exception, error), result.exception


def test_main_prints_domain_errors_as_one_line(tmp_path, monkeypatch, capsys):
    from adapterctl.client.cli import main as main_module

    monkeypatch.setattr("sys.argv", ["adapterctl", "show", "nope:1", "--registry", str(tmp_path / "reg")])
    with pytest.raises(SystemExit) as exit_info:
        main_module.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: nope:1 not found") and err.count("\n") == 1


def test_bad_label_is_a_usage_error(cli, tmp_path):
    result = cli("publish", make_adapter(tmp_path / "a"), "--name", "x", "--label", "novalue",
                 "--registry", tmp_path / "reg", ok=False)
    assert result.exit_code == 2 and "is not KEY=VALUE" in result.output

