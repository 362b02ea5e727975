"""``adapterctl eval``: held-out loss/perplexity of a published version with the trainer's
data pipeline, checked against transformers' own loss; ``--record`` stores labels."""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from adapterctl.client.cli.eval_cmd import COMMANDS as EVAL
from adapterctl.client.cli.registry_cmds import COMMANDS as REGISTRY
from adapterctl.errors import FailedPrecondition

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "prompt_completion.jsonl"


@pytest.fixture
def published(tiny_config, tmp_path):
    from adapterctl.registry import open_registry
    from adapterctl.trainer import train

    uri = str(tmp_path / "reg")
    train(tiny_config(data=str(DATA), max_steps=8, publish="reviews", registry=uri))
    return open_registry(uri)


def run(*args):
    group = click.Group("adapterctl", commands={c.name: c for c in [*EVAL, *REGISTRY]})
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)


def hf_loss(base, adapter_dir: Path, data: Path) -> float:
    """Token-weighted mean of transformers' per-record loss (its own label shift)."""
    import torch
    from peft import PeftModel

    from adapterctl.basemodel import load_model, load_tokenizer
    from adapterctl.trainer.data import load_jsonl, tokenize

    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base, "cpu"), str(adapter_dir)).eval()
    total = count = 0
    with torch.no_grad():
        for ex in tokenize(load_jsonl(data), tok, max_seq_len=1024, train_on_inputs=False).examples:
            n = sum(label != -100 for label in ex.labels[1:])
            out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
            total += float(out.loss) * n
            count += n
    return total / count


def test_eval_matches_transformers_and_records_labels(published, tiny_base, tmp_path):
    from adapterctl.trainer.evaluate import evaluate

    reg = ["--registry", published.uri]
    before = published.resolve("reviews:1")
    result = run("eval", "reviews:1", "--data", DATA, "--json", "--record", *reg)
    assert result.exit_code == 0, (result.output, result.exception)
    got = json.loads(result.output)
    assert got["ref"] == "reviews:1" and got["recorded"] and got["records"] == 12
    expected = hf_loss(tiny_base, published.pull("reviews:1", tmp_path / "pulled"), DATA)
    assert got["loss"] == pytest.approx(expected, rel=1e-4)
    assert got["perplexity"] == pytest.approx(2.718281828 ** got["loss"], rel=1e-6)
    base_only = evaluate(tiny_base, None, DATA)
    assert base_only.tokens == got["tokens"] and got["loss"] < base_only.loss  # trained on this data

    shown = json.loads(run("show", "reviews:1", "--json", *reg).output)
    assert shown["labels"]["eval.loss"] == f"{got['loss']:.6g}"
    assert shown["labels"]["eval.data"] == got["data_sha256"] and shown["labels"]["eval.tokens"] == str(got["tokens"])
    assert shown["digest"] == before.digest  # the manifest did not change


def test_eval_refuses_a_base_with_another_fingerprint(published, tmp_path):
    import shutil

    other = tmp_path / "other-base"
    base_dir = Path(published.resolve("reviews:1").base_model["id"])
    shutil.copytree(base_dir, other, ignore=shutil.ignore_patterns("adapterctl-base.json"))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    result = run("eval", "reviews:1", "--data", DATA, "--base-model", other, "--registry", published.uri)
    assert result.exit_code != 0 and isinstance(result.exception, FailedPrecondition)
    assert "pass --base-model" in str(result.exception)
