"""``adapterctl eval REF --data FILE.jsonl [--record]``: held-out loss and perplexity of
a published version, computed locally with the trainer's data pipeline and PEFT;
``--record`` stores them as labels on the version (beside its immutable manifest)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from adapterctl.client.cli.registry_cmds import registry_options
from adapterctl.refs import parse_ref
from adapterctl.registry import Registry


@click.command("eval")
@click.argument("ref")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out JSONL (text, prompt/completion or messages, as for train).")
@click.option("--record", is_flag=True, help="Store eval.loss, eval.perplexity, eval.tokens and eval.data "
              "(the file's sha256) as labels on the version.")
@click.option("--base-model", default=None, help="Base id or directory (default: the one the manifest names).")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Records are truncated to this many tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Torch device for the forward passes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_options
def eval_(ref: str, data: Path, record: bool, base_model: str | None, max_seq_len: int, batch_size: int, device: str,
          as_json: bool, registry: Registry) -> None:
    """Loss and perplexity of REF (NAME:VERSION, NAME:ALIAS, ...) on --data, computed locally."""
    from adapterctl.trainer.evaluate import evaluate_ref

    parse_ref(ref)
    result = evaluate_ref(registry, ref, data, base_model=base_model, max_seq_len=max_seq_len,
                          batch_size=batch_size, device=device)
    if record:
        name, _, version = result.ref.partition(":")
        registry.set_labels(name, int(version), result.labels())
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "recorded": record}))
        return
    click.echo(f"{result.ref}\tloss {result.loss:.4f}\tperplexity {result.perplexity:.3f}\t"
               f"({result.tokens} tokens in {result.records} records, data {result.data_sha256[:19]}...)"
               + ("\trecorded as labels" if record else ""))


COMMANDS = [eval_]
