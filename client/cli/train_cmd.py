"""``adapterctl train``: a thin shell over :mod:`adapterctl.trainer.cli`.

The options are generated from the TrainConfig dataclass on first use (help or
parsing), so importing the CLI does not import the trainer.
"""
from __future__ import annotations

from typing import Any

import click


class _TrainCommand(click.Command):
    """Pulls its parameters and body from the trainer lazily (client layering rule)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self.params:
            from adapterctl.trainer.cli import HELP, config_params

            self.params = config_params()
            self.help = HELP
        return super().get_params(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        from adapterctl.trainer.cli import run

        return ctx.invoke(run, **ctx.params)


train = _TrainCommand("train", short_help="Train a LoRA adapter on JSONL data (text, prompt/completion, messages).")

COMMANDS = [train]
