"""CLI for weighted aliases and labels: promote --canary, show/list with weights,
rollback dropping the canary first, label, and show --json's digest."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from registry_testkit import make_adapter

from adapterctl.client.cli.registry_cmds import COMMANDS


@pytest.fixture
def cli(tmp_path):
    group = click.Group("adapterctl", commands={c.name: c for c in COMMANDS})
    runner = CliRunner()
    reg = ["--registry", str(tmp_path / "reg")]

    def run(*args, ok: bool = True):
        result = runner.invoke(group, [str(a) for a in (*args, *reg)], catch_exceptions=True)
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    for seed in range(4):
        run("publish", make_adapter(tmp_path / f"v{seed}", seed=seed), "--name", "reviews")
    run("promote", "reviews:3", "prod")
    return run


def test_canary_promote_show_list_and_rollback(cli):
    assert cli("promote", "reviews:4", "prod", "--canary", "10").output == \
        "reviews:prod -> reviews:3 (90%), reviews:4 (10%)\n"
    human = cli("show", "reviews:prod").output
    assert "routing:    reviews:3 90%, reviews:4 10%" in human and "aliases:    prod(90%)" in human
    shown = json.loads(cli("show", "reviews:prod", "--json").output)
    assert shown["version"] == 3 and shown["digest"].startswith("sha256:") and len(shown["digest"]) == 71
    assert shown["route"] == {"alias": "prod", "primary": {"version": 3, "weight": 90.0},
                              "canary": {"version": 4, "weight": 10.0}}
    assert json.loads(cli("show", "reviews:4", "--json").output)["alias_weights"] == {"prod": 10.0}
    rows = {line.split("\t")[0]: line.split("\t")[5] for line in cli("list", "reviews").output.splitlines()[1:]}
    assert rows == {"1": "-", "2": "-", "3": "prod(90%)", "4": "prod(10%)"}

    assert cli("rollback", "reviews", "prod").output == "reviews:prod -> reviews:3 (canary reviews:4 dropped)\n"
    assert "routing:    reviews:3 100%" in cli("show", "reviews:prod").output
    cli("promote", "reviews:4", "prod", "--canary", "10")
    assert cli("promote", "reviews:4", "prod").output == "reviews:prod -> reviews:4 (was 3)\n"
    assert cli("rollback", "reviews", "prod").output == "reviews:prod -> reviews:3\n"


def test_canary_refusals_are_one_line(cli):
    for bad in ("0", "100", "abc"):
        result = cli("promote", "reviews:4", "prod", "--canary", bad, ok=False)
        assert result.exit_code == 2 and "--canary" in result.output
    result = cli("promote", "reviews:4", "staging", "--canary", "10", ok=False)
    assert result.exit_code != 0 and "promote a primary first" in str(result.exception)


def test_labels_set_after_publish_show_up(cli):
    assert cli("label", "reviews:2", "eval.loss=1.5", "owner=me").output == "eval.loss=1.5\nowner=me\n"
    assert cli("label", "reviews:2", "owner-").output == "eval.loss=1.5\n"
    shown = json.loads(cli("show", "reviews:2", "--json").output)
    assert shown["labels"] == {"eval.loss": "1.5"}
    assert "labels:     eval.loss=1.5" in cli("show", "reviews:2").output
