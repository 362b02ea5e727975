"""``adapterctl serve``: the inference server; options come from ``ServerConfig``'s fields."""
from __future__ import annotations

import sys
from typing import Any

import click


def _build() -> click.Command:
    # ServerConfig is a light module (dataclasses only); heavy server code loads in the command.
    from adapterctl.options import click_options, from_kwargs
    from adapterctl.server.config import CLI_SETTINGS, ServerConfig

    @click.command("serve")
    @click_options(ServerConfig, **CLI_SETTINGS)
    def serve(**options: Any) -> None:
        """Serve the base model and registry adapters over gRPC (health, reflection, /metrics).

        Every option also reads ADAPTERCTL_<OPTION> from the environment. SIGTERM drains:
        health NOT_SERVING, new requests UNAVAILABLE, in-flight ones get --shutdown-grace.
        """
        from adapterctl.server import logs
        from adapterctl.server.app import run

        config = from_kwargs(ServerConfig, options)
        logs.configure(config.log_json)
        sys.exit(run(config))

    return serve


COMMANDS = [_build()]
