"""Root of the ``adapterctl`` CLI: it only assembles the noun modules.

Known errors (:class:`adapterctl.errors.AdapterctlError`, click usage errors)
print one line and exit 1 (2 for usage); set ``ADAPTERCTL_DEBUG=1`` for tracebacks.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from adapterctl import __version__
from adapterctl.errors import AdapterctlError

# module name -> attribute holding a list of click commands it contributes.
_COMMAND_MODULES = (
    "adapterctl.client.cli.registry_cmds",
    "adapterctl.client.cli.train_cmd",
    "adapterctl.client.cli.serve_cmd",
    "adapterctl.client.cli.generate_cmd",
    "adapterctl.client.cli.adapters_cmd",
    "adapterctl.client.cli.eval_cmd",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adapterctl")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """adapterctl: train, publish and serve LoRA adapters for one base model."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    """Add every noun module's commands. A module that fails to import stops the CLI with
    its error: a missing command would otherwise hide a packaging mistake."""
    for module_name in _COMMAND_MODULES:
        for command in importlib.import_module(module_name).COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point: domain errors become one line on stderr."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AdapterctlError as exc:
        if os.environ.get("ADAPTERCTL_DEBUG"):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
