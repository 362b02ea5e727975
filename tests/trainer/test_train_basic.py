"""Issue 2 contract: a few steps change the adapter, lower the loss, and load with stock PEFT."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

DEMO_DATA = Path(__file__).resolve().parents[2] / "examples" / "movie_reviews.jsonl"


def test_train_writes_loadable_adapter_that_lowers_loss(tiny_config, tiny_base):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from adapterctl.basemodel import load_model, load_tokenizer
    from adapterctl.trainer import train
    from adapterctl.trainer.collate import RightPadCollator
    from adapterctl.trainer.data import load_jsonl, tokenize

    result = train(tiny_config(max_steps=8))
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapterctl.json",
    ]
    assert len(result.losses) == 8 and result.steps == 8

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: training moved it

    manifest = json.loads((out / "adapterctl.json").read_text())
    assert manifest["format"] == "adapterctl.adapter/v1"
    assert manifest["base_model"]["fingerprint"] == tiny_base.fingerprint
    assert manifest["base_model"]["config"]["hidden_size"] == 64
    assert manifest["lora"] == {"rank": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                                "use_rslora": False, "use_dora": False}
    training = manifest["training"]
    assert training["dataset"]["train_records"] == 48 and len(training["dataset"]["train_sha256"]) == 64
    assert training["metrics"]["train_loss"] == pytest.approx(result.train_loss)
    assert {"torch", "transformers", "peft"} <= set(training["versions"])
    assert training["config"]["max_steps"] == 8 and training["wall_time_s"] > 0

    # Stock PEFT loads it; the adapter lowers the loss on the training data versus the base.
    model = PeftModel.from_pretrained(load_model(tiny_base, device="cpu"), str(out)).eval()
    tok = load_tokenizer(tiny_base)
    examples = tokenize(load_jsonl(tiny_config().data), tok, max_seq_len=64, train_on_inputs=False).examples
    batch = RightPadCollator(tok.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad():
        adapted = model(**batch).loss.item()
        with model.disable_adapter():
            base = model(**batch).loss.item()
    assert adapted < base - 0.01


def test_cli_train_and_one_line_error(tiny_base, tmp_path, monkeypatch, capsys):
    from click.testing import CliRunner

    from adapterctl.client.cli.main import cli, main

    out = tmp_path / "cli-adapter"
    args = ["train", "--data", str(DEMO_DATA), "--output", str(out), "--base-model", str(tiny_base.path),
            "--max-steps", "2", "--rank", "4", "--alpha", "8", "--target-modules", "q_proj,k_proj", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "train loss" in result.output and (out / "adapter_model.safetensors").is_file()
    lora = json.loads((out / "adapterctl.json").read_text())["lora"]
    assert lora["rank"] == 4 and lora["target_modules"] == ["k_proj", "q_proj"]

    # A domain error through the real entry point: one line on stderr, exit code 1.
    missing = tmp_path / "nope.jsonl"
    monkeypatch.setattr(sys, "argv", ["adapterctl", "train", "--data", str(missing), "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.jsonl" in err and err.startswith("error:")

    # A bad option value is a usage error (exit 2), still one line of explanation.
    result = CliRunner().invoke(cli, ["train", "--data", str(DEMO_DATA), "--output", str(out), "--rank", "0"])
    assert result.exit_code != 0


def test_cli_interrupt_exits_130_with_resume_hint(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from adapterctl.client.cli.main import cli
    from adapterctl.trainer import loop

    def interrupted(config, callbacks=None):
        raise loop.TrainingInterrupted(3, config.checkpoints)

    monkeypatch.setattr(loop, "train", interrupted)
    result = CliRunner().invoke(cli, ["train", "--data", str(DEMO_DATA), "--output", str(tmp_path / "o")])
    assert result.exit_code == 130
    assert "interrupted at step 3" in result.output and "--resume" in result.output


@pytest.mark.slow
def test_real_gemma_chat_adapter_loads_with_stock_peft(gemma_base, tmp_path):
    """The real tokenizer's chat template masks non-assistant tokens; the adapter loads with PEFT."""
    import torch
    from peft import PeftModel

    from adapterctl.basemodel import load_model
    from adapterctl.trainer import TrainConfig, train

    data = DEMO_DATA.parent / "chat_messages.jsonl"
    result = train(TrainConfig(data=str(data), output=str(tmp_path / "critic"), base_model="gemma-3-270m",
                               max_steps=2, batch_size=2, lr=1e-3, progress=False))
    assert result.manifest["training"]["dataset"]["format"] == "messages"
    assert all(torch.isfinite(torch.tensor(result.losses)))
    model = PeftModel.from_pretrained(load_model(gemma_base, device="cpu"), str(result.output_dir))
    assert model.peft_config["default"].r == 16
