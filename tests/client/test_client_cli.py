"""``adapterctl generate`` and ``adapterctl adapters ...`` against a model-free echo server."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from adapterctl.client.cli.main import cli
from adapterctl.errors import NotFound


@pytest.fixture
def address(echo_server):
    return echo_server().address


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def test_generate_prints_text(address):
    result = _run("generate", "--server", address, "--max-new-tokens", "5", "hello world")
    assert result.exit_code == 0 and result.output == "hello\n"


def test_generate_stream_and_json(address):
    assert _run("generate", "--server", address, "--stream", "abc").output == "abc\n"
    result = _run("generate", "--server", address, "--json", "--adapter", "echo:1", "--seed", "3", "hey")
    payload = json.loads(result.output)
    assert payload["text"] == "hey" and payload["adapter"]["name"] == "echo" and payload["finish_reason"] == "length"


def test_generate_chat_sends_messages(address):
    out = _run("generate", "--server", address, "--system", "be nice", "hi").output
    assert out.strip() == "<system>be nice<user>hi<model>"


def test_generate_unknown_adapter_is_a_domain_error(address):
    result = _run("generate", "--server", address, "--adapter", "nosuch", "hi")
    assert result.exit_code != 0 and isinstance(result.exception, NotFound)


def test_cli_prints_one_line_and_exits_1(address):
    proc = subprocess.run([sys.executable, "-m", "adapterctl.client.cli.main", "generate", "--server", address,
                           "--adapter", "nosuch", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: NOT_FOUND: adapter 'nosuch' not found"]


def test_adapters_commands(address):
    listing = _run("adapters", "ls", "--server", address)
    assert listing.exit_code == 0 and listing.output.splitlines()[0].split()[:4] == [
        "NAME",
        "VERSION",
        "ALIASES",
        "TIER",
    ]
    assert "echo" in listing.output.splitlines()[1]
    rows = [json.loads(line) for line in _run("adapters", "ls", "--server", address, "--json").output.splitlines()]
    assert rows[0]["name"] == "echo" and rows[0]["tier"] == "device"
    for action in ("load", "pin", "unpin", "unload"):
        result = _run("adapters", action, "--server", address, "echo")
        assert result.exit_code == 0 and result.output.startswith("echo:1 sha256:"), (action, result.output)
    assert _run("adapters", "refresh", "--server", address).output == "echo:prod 1 -> 2\n"


def test_token_file_and_env(echo_server, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-admin admin\n")
    address = echo_server(auth_token_file=tokens).address
    assert isinstance(_run("adapters", "ls", "--server", address).exception, Exception)
    mine = tmp_path / "mine"
    mine.write_text("secret-admin\n")
    assert _run("adapters", "ls", "--server", address, "--token-file", str(mine)).exit_code == 0
    monkeypatch.setenv("ADAPTERCTL_TOKEN", "secret-admin")
    assert _run("generate", "--server", address, "ok").output == "ok\n"
