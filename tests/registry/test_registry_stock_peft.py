"""Publishing a directory written by stock ``PeftModel.save_pretrained`` with no flag:
the base named by adapter_config.json's base_model_name_or_path is used when this
machine has it (the prepared default, a local directory, a cached hub id), and the
manifest records its canonical id and fingerprint. One-line refusal otherwise."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from adapterctl.client.cli.registry_cmds import COMMANDS
from adapterctl.errors import FailedPrecondition


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from adapterctl.basemodel import load_model

    return load_model(tiny_base, device="cpu")


def save_stock_peft(model, base_path: Path, out: Path) -> Path:
    """What a user's own training script writes: PEFT's save_pretrained, nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = copy.deepcopy(model)
    model.name_or_path = str(base_path)  # what from_pretrained(base_path) records
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(str(out))
    assert not (out / "adapterctl.json").exists()
    return out


def run_cli(*args):
    group = click.Group("adapterctl", commands={c.name: c for c in COMMANDS})
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)


def test_stock_peft_on_the_prepared_default_records_the_canonical_id(tiny_base, tiny_model, tmp_path, monkeypatch):
    # A home whose prepared default (models/gemma-3-270m) is the tiny model's directory.
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "gemma-3-270m").symlink_to(tiny_base.path, target_is_directory=True)
    monkeypatch.setenv("ADAPTERCTL_HOME", str(home))
    local_path = home / "models" / "gemma-3-270m"
    adapter = save_stock_peft(tiny_model, local_path, tmp_path / "stock")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(local_path)

    result = run_cli("publish", adapter, "--name", "stock", "--registry", tmp_path / "reg")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == "stock:1\n"
    assert "base model: gemma-3-270m (sha256:" in result.stderr and "inferred from adapter_config.json" in result.stderr
    shown = json.loads(run_cli("show", "stock:1", "--json", "--registry", tmp_path / "reg").stdout)
    assert shown["base_model"] == {"id": "gemma-3-270m", "fingerprint": tiny_base.fingerprint}
    assert {f["path"] for f in shown["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_stock_peft_on_a_local_directory_and_on_a_cached_hub_id(tiny_base, tiny_model, tmp_path, monkeypatch):
    from adapterctl.registry import open_registry

    reg = open_registry(str(tmp_path / "reg"))
    m = reg.publish(save_stock_peft(tiny_model, tiny_base.path, tmp_path / "local"), "local")
    assert m.base_model == {"id": str(tiny_base.path), "fingerprint": tiny_base.fingerprint}

    # A hub id present in the local Hugging Face cache (HF_HUB_OFFLINE=1: nothing is downloaded).
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf"
    commit = "0" * 40
    snapshot = cache / "models--acme--tiny-gemma" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_base.path.iterdir():
        if f.suffix in (".json", ".safetensors") and f.name != "adapterctl-base.json":
            os.symlink(f, snapshot / f.name)
    (cache / "models--acme--tiny-gemma" / "refs").mkdir()
    (cache / "models--acme--tiny-gemma" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home2"))  # fingerprint cache for the read-only case
    adapter = save_stock_peft(tiny_model, Path("acme/tiny-gemma"), tmp_path / "hub")
    m = reg.publish(adapter, "hub")
    assert m.base_model == {"id": "acme/tiny-gemma", "fingerprint": tiny_base.fingerprint}


def test_a_base_that_does_not_resolve_is_refused_in_one_line(tiny_model, tmp_path):
    for named in ("/nonexistent/models/base", "nobody/not-cached-model"):
        adapter = save_stock_peft(tiny_model, Path(named), tmp_path / named.replace("/", "_"))
        result = run_cli("publish", adapter, "--name", "x", "--registry", tmp_path / "reg")
        assert result.exit_code != 0 and isinstance(result.exception, FailedPrecondition)
        message = str(result.exception)
        assert f"names base model {named!r}, which does not resolve on this machine" in message
        assert "pass --base-model" in message and "\n" not in message
    assert not (tmp_path / "reg" / "adapters").exists()


@pytest.mark.slow
def test_stock_peft_on_the_real_gemma_publishes_without_a_flag(gemma_base, tmp_path):
    from adapterctl.basemodel import load_model

    adapter = save_stock_peft(load_model(gemma_base, device="cpu"), gemma_base.path, tmp_path / "gemma-stock")
    result = run_cli("publish", adapter, "--name", "g", "--registry", tmp_path / "reg")
    assert result.exit_code == 0, (result.output, result.exception)
    shown = json.loads(run_cli("show", "g:1", "--json", "--registry", tmp_path / "reg").stdout)
    assert shown["base_model"] == {"id": "gemma-3-270m", "fingerprint": gemma_base.fingerprint}
