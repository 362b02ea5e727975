"""Click parameters generated from :class:`TrainConfig` fields, and the command body they feed.

Used by ``adapterctl train`` (the client CLI, which imports this lazily) and by
``python -m adapterctl.trainer`` (what ``accelerate launch``/``torchrun`` workers run).
"""
from __future__ import annotations

import os
from typing import Any

import click

from adapterctl.options import click_params
from adapterctl.trainer.config import TrainConfig

HELP = """Train a LoRA adapter on JSONL data and write a PEFT adapter directory.

\b
Data formats (detected per file, or --format):
  {"text": ...}                                   loss on every token
  {"prompt": ..., "completion": ...}              loss on the completion only
  {"messages": [{"role": ..., "content": ...}]}   loss on assistant turns only
--train-on-inputs puts the loss on prompts / user turns too.
Options come from TrainConfig defaults < --config FILE < environment < flags.

\b
Example:
  adapterctl train --data examples/movie_reviews.jsonl --output out/reviews --max-steps 30 --publish reviews
"""


def config_params() -> list[click.Parameter]:
    """``--config`` plus one option per TrainConfig field, in declaration order."""
    params: list[click.Parameter] = [click.Option(
        ["--config", "config_file"], type=click.Path(dir_okay=False), default=None,
        help="YAML/TOML/JSON file of options (keys as below, - or _); flags override it.")]
    return params + click_params(TrainConfig, defer_defaults=True)


def run(config_file: str | None, **values: Any) -> None:
    """Command body: resolve the config, train, print a short summary. Ctrl-C exits 130
    after the checkpoint is saved."""
    from adapterctl.trainer.loop import TrainingInterrupted, train

    config = TrainConfig.from_sources(config_file, values)
    try:
        result = train(config)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(130) from None
    from adapterctl.trainer.launch import RESULT_ENV

    if int(os.environ.get("RANK", "0")) != 0 or RESULT_ENV in os.environ:  # rank 0 / the launcher reports
        return
    click.echo(f"adapter: {result.output_dir}")
    click.echo(f"steps: {result.steps}  train loss: {result.train_loss:.4f}  tokens/s: {result.tokens_per_s:,.0f}"
               f"  wall: {result.wall_time_s:.1f}s")
    if result.eval_loss is not None:
        click.echo(f"eval loss: {result.eval_loss:.4f}  eval perplexity: {result.eval_perplexity:.2f}")
    if result.published:
        click.echo(f"published: {result.published}")


def make_command(name: str = "train") -> click.Command:
    return click.Command(name, params=config_params(), callback=run, help=HELP)
