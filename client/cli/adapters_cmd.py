"""``adapterctl adapters ls|load|unload|pin|unpin|refresh``: the Admin RPCs of a running server."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from adapterctl.client.cli.generate_cmd import connection_options, make_client


@click.group("adapters")
def adapters() -> None:
    """Inspect and manage the adapters resident on a server (admin token when auth is on)."""


def _print_info(info: Any) -> None:
    pin = ", pinned" if info.pinned else ""
    click.echo(f"{info.name}:{info.version} {info.digest} tier={info.tier}{pin}")


@adapters.command("ls")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per adapter version.")
@click.argument("name", required=False, default="")
def ls(name: str, as_json: bool, **opts: Any) -> None:
    """List adapter versions (all, or NAME's) and where each is resident."""
    with make_client(opts) as client:
        rows = client.list_adapters(name)
    if as_json:
        for row in rows:
            click.echo(json.dumps(asdict(row)))
        return
    header = ("NAME", "VERSION", "ALIASES", "TIER", "PINNED", "RANK", "BYTES", "ACTIVE", "DIGEST")
    table = [header] + [(r.name, str(r.version), ",".join(r.aliases) or "-", r.tier, "yes" if r.pinned else "-",
                         str(r.rank), str(r.bytes), str(r.active_requests), r.digest[:19]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _single(action: str, help_text: str):
    @connection_options
    @click.argument("ref")
    def command(ref: str, **opts: Any) -> None:
        with make_client(opts) as client:
            _print_info(getattr(client, f"{action}_adapter")(ref))

    command.__doc__ = help_text
    return adapters.command(action)(command)


_single("load", "Fetch REF into the server's caches and a device slot now.")
_single("unload", "Drop REF from the server's device and host tiers (refused while pinned or in use).")
_single("pin", "Keep REF resident until unpinned.")
_single("unpin", "Let REF be evicted again.")


@adapters.command("refresh")
@connection_options
def refresh(**opts: Any) -> None:
    """Re-resolve aliases against the registry now (hot reload)."""
    with make_client(opts) as client:
        changes = client.refresh_aliases()
    for c in changes:
        click.echo(f"{c.name}:{c.alias} {c.old_version} -> {c.new_version}")
    if not changes:
        click.echo("no alias changed")


COMMANDS = [adapters]
