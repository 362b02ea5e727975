"""Fixtures for the adapter cache tests: real PEFT adapters saved from the tiny base."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_base):
    """The tiny base model, loaded once; copy it before wrapping with PEFT."""
    from adapterctl.basemodel import load_model

    return load_model(tiny_base, device="cpu")


@pytest.fixture(scope="session")
def make_adapter(tiny_model, tiny_base, tmp_path_factory) -> Callable[..., Path]:
    """``make_adapter(name, meta=True, **LoraConfig kwargs) -> dir``: a PEFT LoRA saved
    with ``save_pretrained`` from the tiny base (random B so deltas are non-zero),
    plus an ``adapterctl.json`` naming the tiny base's fingerprint when ``meta``."""
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft-adapters")
    made: dict[str, Path] = {}

    def make(name: str, meta: bool = True, seed: int = 0, **kwargs) -> Path:
        if name in made:
            return made[name]
        kwargs.setdefault("r", 4)
        kwargs.setdefault("lora_alpha", 8)
        kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
        kwargs.setdefault("init_lora_weights", False)
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(**kwargs))
        out = root / name
        peft_model.save_pretrained(str(out))
        (out / "README.md").unlink(missing_ok=True)
        if meta:
            (out / "adapterctl.json").write_text(json.dumps({
                "format": "adapterctl.adapter/v1",
                "base_model": {"id": tiny_base.id, "fingerprint": tiny_base.fingerprint},
                "lora": {"rank": kwargs["r"], "alpha": kwargs["lora_alpha"]},
            }))
        made[name] = out
        return out

    return make
