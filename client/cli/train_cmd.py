"""``adapterctl train``: its options are generated from the fields of :class:`TrainConfig`.

Precedence: TrainConfig defaults < ``--config FILE`` (YAML/TOML/JSON) < environment < flags.
"""
from __future__ import annotations

import typing
from typing import Any, Callable

import click

from adapterctl.trainer.config import option_fields


def _scalar(tp: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` -> list."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return typing.get_origin(tp) or tp


def _click_option(field: Any, tp: Any) -> Callable:
    meta = field.metadata
    name = "--" + field.name.replace("_", "-")
    default = field.default_factory() if callable(field.default_factory) else field.default  # type: ignore[misc]
    shown = ",".join(default) if isinstance(default, list) else default
    help_text = meta["help"] + ("" if shown in (None, "") or isinstance(shown, bool) and not shown else f"  [default: {shown}]")
    kind = _scalar(tp)
    kw: dict[str, Any] = {"default": None, "help": help_text, "envvar": meta.get("envvar"), "show_envvar": bool(meta.get("envvar"))}
    if kind is bool:
        no = "--no-" + field.name.replace("_", "-")
        return click.option(f"{name}/{no}", field.name, **kw)
    if "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif kind is list:
        kw["type"] = str
        kw["metavar"] = "A,B,..."
    else:
        kw["type"] = {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
    return click.option(name, field.name, **kw)


def config_options(func: Callable) -> Callable:
    """Decorate ``func`` with one click option per TrainConfig field (declaration order)."""
    for field, tp in reversed(option_fields()):
        func = _click_option(field, tp)(func)
    return func


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML/TOML/JSON file of options (keys as below, - or _); flags override it.")
@config_options
def train(config_file: str | None, **values: Any) -> None:
    """Train a LoRA adapter on JSONL data and write a PEFT adapter directory.

    \b
    Data formats (detected per file, or --format):
      {"text": ...}                                   loss on every token
      {"prompt": ..., "completion": ...}              loss on the completion only
      {"messages": [{"role": ..., "content": ...}]}   loss on assistant turns only
    --train-on-inputs puts the loss on prompts / user turns too.

    \b
    Example:
      adapterctl train --data examples/movie_reviews.jsonl --output out/reviews --max-steps 30 --publish reviews
    """
    from adapterctl.trainer import TrainConfig, TrainingInterrupted
    from adapterctl.trainer import train as run_training

    config = TrainConfig.from_sources(config_file, values)
    try:
        result = run_training(config)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(130) from None
    click.echo(f"adapter: {result.output_dir}")
    click.echo(f"steps: {result.steps}  train loss: {result.train_loss:.4f}  tokens/s: {result.tokens_per_s:,.0f}"
               f"  wall: {result.wall_time_s:.1f}s")
    if result.eval_loss is not None:
        click.echo(f"eval loss: {result.eval_loss:.4f}  eval perplexity: {result.eval_perplexity:.2f}")
    if result.published:
        click.echo(f"published: {result.published}")


COMMANDS = [train]
