"""``adapterctl generate``: one generation through a running server, or the same request
for several ``--adapter`` references side by side; also the shared connection options
(--server, --token, TLS, --timeout) of every client command."""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def connection_options(func: Callable) -> Callable:
    """Adds --server/--token/--token-file/--tls-ca/--tls-cert/--tls-key/--tls-server-name/--timeout."""
    options = [
        click.option("--server", default="127.0.0.1:50051", show_default=True, envvar="ADAPTERCTL_SERVER",
                     help="HOST:PORT of the adapterctl server."),
        click.option("--token", envvar="ADAPTERCTL_TOKEN", help="Bearer token (prefer $ADAPTERCTL_TOKEN or "
                     "--token-file: arguments are visible to other users)."),
        click.option("--token-file", type=_FILE, help="File whose first line is the bearer token."),
        click.option("--tls", is_flag=True, help="Use TLS with the system's root certificates."),
        click.option("--tls-ca", type=_FILE, help="PEM root certificate(s) to verify the server (implies --tls)."),
        click.option("--tls-cert", type=_FILE, help="PEM client certificate for mTLS."),
        click.option("--tls-key", type=_FILE, help="PEM key of --tls-cert."),
        click.option("--tls-server-name", help="Name to verify in the server certificate instead of the host."),
        click.option("--timeout", type=float, help="Deadline per call, in seconds."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def make_client(opts: dict[str, Any]):
    """A :class:`adapterctl.client.Client` from the connection options (popped from ``opts``)."""
    from adapterctl.client.client import Client

    token = opts.pop("token")
    token_file = opts.pop("token_file")
    if token_file:
        token = token_file.read_text().splitlines()[0].strip()
    return Client(opts.pop("server"), token=token, tls=opts.pop("tls"), root_certificates=opts.pop("tls_ca"),
                  client_cert=opts.pop("tls_cert"), client_key=opts.pop("tls_key"),
                  server_name=opts.pop("tls_server_name"), timeout=opts.pop("timeout"))


@click.command("generate")
@connection_options
@click.option("--adapter", "-a", "adapters", multiple=True, help="Adapter reference: NAME, NAME:VERSION, "
              "NAME:ALIAS, NAME@sha256:... (default: the base model; \"\" names it too). Repeat to compare: the "
              "same request goes to each concurrently and the results print side by side.")
@click.option("--routing-key", default="", help="Sticky routing key (an end-user id) for weighted aliases.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--max-new-tokens", "-n", type=int, default=0, help="Tokens to generate (0 = server default).")
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, help="Nucleus sampling mass in (0, 1].")
@click.option("--top-k", type=int, default=0, help="Keep the k most likely tokens (0 = off).")
@click.option("--seed", type=int, help="Sampler seed (same seed, same output).")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user chat turn (rendered with the chat template).")
@click.option("--system", help="System message (implies --chat).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.argument("prompt")
def generate(prompt: str, adapters: tuple[str, ...], stream: bool, chat: bool, system: str | None, as_json: bool,
             **opts: Any) -> None:
    """Generate a completion for PROMPT ("-" reads stdin) and print it."""
    if prompt == "-":
        prompt = sys.stdin.read()
    if len(adapters) > 1 and stream:
        raise click.UsageError("--stream takes one --adapter; several are compared side by side")
    client = make_client(opts)
    params: dict[str, Any] = dict(opts)
    if chat or system:
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        params["messages"] = turns
    else:
        params["prompt"] = prompt
    if len(adapters) > 1:
        with client:
            results = client.compare(adapters=list(adapters), **params)
        _print_comparison(adapters, results, prompt, as_json)
        return
    params["adapter"] = adapters[0] if adapters else ""
    with client:
        if stream:
            handle = client.generate_stream(**params)
            for chunk in handle:
                if not as_json:
                    click.echo(chunk.text, nl=False)
            result = handle.result
            if not as_json:
                click.echo()
        else:
            result = client.generate(**params)
            if not as_json:
                click.echo(result.text)
    if as_json and result is not None:
        click.echo(json.dumps(asdict(result)))


def _print_comparison(refs: tuple[str, ...], results: list, prompt: str, as_json: bool) -> None:
    """One JSON object per line with the requested ``ref``, or a table (one column per reference)."""
    if as_json:
        for ref, result in zip(refs, results):
            click.echo(json.dumps({"ref": ref, **asdict(result)}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prompt: {prompt!r}", show_lines=True)
    for ref, result in zip(refs, results):
        served = f"{result.adapter.name}:{result.adapter.version}" if result.adapter and result.adapter.name else "base"
        table.add_column(
            f"{ref or 'base model'}\n-> {served}, {result.completion_tokens} tokens, {result.finish_reason}"
        )
    table.add_row(*(result.text for result in results))
    Console(width=max(80, 40 * len(results))).print(table)


COMMANDS = [generate]
